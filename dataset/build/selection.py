"""Which products and photos enter a version (the original project's product selection).

Products with fewer kept photos than the minimum are left out and reported with their counts.
A product with more kept photos than the maximum keeps at most that many: first the photos that
were already in the parent version (so a version does not churn), then new ones, each group in
seeded-hash order, so the choice is deterministic and unrelated to crawl order.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

from dataset.build.splits import seeded_key


@dataclass
class Selection:
    chosen: list[Any]
    # [{"product_id", "photos"}] left out for too few kept photos
    excluded: list[dict[str, int]] = field(default_factory=list)
    # [{"product_id", "photos", "selected"}] cut down to the maximum
    capped: list[dict[str, int]] = field(default_factory=list)


def select_photos(kept: Sequence[Any], min_photos: int, max_photos: int,
                  in_parent: Collection[str], seed: str) -> Selection:
    """``kept`` rows have ``.sha256`` and ``.product_id``; returns the chosen rows."""
    if min_photos < 1 or max_photos < min_photos:
        raise ValueError(f"need 1 <= min_photos <= max_photos, got {min_photos}, {max_photos}")
    by_product: dict[int, list[Any]] = defaultdict(list)
    for row in kept:
        by_product[int(row.product_id)].append(row)

    selection = Selection(chosen=[])
    for product_id in sorted(by_product):
        photos = by_product[product_id]
        if len(photos) < min_photos:
            selection.excluded.append({"product_id": product_id, "photos": len(photos)})
            continue
        ordered = sorted(photos, key=lambda r: (r.sha256 not in in_parent,
                                                seeded_key(seed, r.sha256)))
        if len(ordered) > max_photos:
            selection.capped.append({"product_id": product_id, "photos": len(ordered),
                                     "selected": max_photos})
        selection.chosen.extend(ordered[:max_photos])
    return selection

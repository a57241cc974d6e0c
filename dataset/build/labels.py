"""The stable label map: one integer label per product, assigned once and never changed.

A product keeps its label in every later version; a product that drops out keeps its label
reserved (labels are never reused); new products get the next labels after the highest ever
assigned, in ascending product id, so the assignment is deterministic.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import sqlalchemy as sa

from shoplens.manifest.schema import label_map


def assign_labels(existing: Mapping[int, int], product_ids: Iterable[int]) -> dict[int, int]:
    """Labels for products that have none yet: ``{product_id: label}`` for the new ones only.

    ``existing`` is the whole stored map (product id -> label), including dropped products, so
    that a new label never collides with a reserved one.
    """
    next_label = max(existing.values(), default=-1) + 1
    new: dict[int, int] = {}
    for product_id in sorted(set(product_ids) - set(existing)):
        new[product_id] = next_label
        next_label += 1
    return new


def load_label_map(conn: sa.Connection) -> dict[int, int]:
    rows = conn.execute(sa.select(label_map.c.product_id, label_map.c.label)).all()
    return {int(product_id): int(label) for product_id, label in rows}


def store_new_labels(conn: sa.Connection, new: Mapping[int, int], version_id: str) -> None:
    """Insert new label rows; the unique constraints reject any attempt to relabel a product."""
    if new:
        conn.execute(label_map.insert(), [
            {"label": label, "product_id": product_id, "first_version": version_id}
            for product_id, label in sorted(new.items(), key=lambda item: item[1])
        ])

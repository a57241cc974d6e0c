"""The replica's answer key: what a perfect crawl of the current shop would find.

Shape documented in docs/replica.md. ``photo_sha256`` is the sha256 of what the CDN serves for
the photo URL without parameters (the file's bytes; for a bad photo, its bad body).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from .catalog import Catalog
from .payloads import photo_url, product_image_url


def build(catalog: Catalog, cdn_url: str, base_url: str, photo_sha256: dict[str, str],
          served: dict[str, set[str]], faults: list[dict],
          hostile: dict | None = None) -> dict:
    categories, products, reviews = [], [], []
    for category_id in sorted(catalog.categories):
        category = catalog.categories[category_id]
        ranked = catalog.ranked(category_id)
        categories.append({"id": category.id, "name": category.name,
                           "product_ids_by_rank": [p.id for p in ranked]})
        for rank, product in enumerate(ranked, start=1):
            products.append({
                "id": product.id, "category_id": product.category_id, "name": product.name,
                "brand": product.brand, "price": product.price,
                "review_count": catalog.review_count(product), "rating": catalog.rating(product),
                "rank": rank, "photo_review_count": catalog.photo_review_count(product),
                "image_url": product_image_url(cdn_url, product), "image_bad": product.image_bad})
            for review in sorted(catalog.published(product), key=lambda r: r.id):
                has_photo = review.photo_id is not None
                reviews.append({
                    "id": review.id, "product_id": product.id,
                    "created_at": review.created_at_text, "stars": review.stars,
                    "comment": review.comment, "writer": review.writer,
                    "photo_id": review.photo_id,
                    "photo_url": photo_url(cdn_url, review.photo_id) if has_photo else None,
                    "photo_sha256": photo_sha256.get(review.photo_id) if has_photo else None,
                    "bad": review.bad})
    return {"build_id": catalog.build_id, "seed": catalog.seed, "base_url": base_url,
            "cdn_url": cdn_url, "categories": categories, "products": products,
            "reviews": reviews, "held_back": [r.id for r in catalog.held_back()],
            "served": {photo_id: sorted(shas) for photo_id, shas in sorted(served.items())},
            "faults": list(faults),
            "hostile": [{"product_id": h.product_id, "kind": h.kind, "review_id": h.review_id}
                        for _, h in sorted((hostile or {}).items())]}


def write(truth: dict, path: Path) -> None:
    """Atomic write, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(truth, ensure_ascii=False))
    tmp.replace(path)

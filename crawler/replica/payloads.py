"""The JSON shapes of store.ohou.se, field for field (docs/replica.md, target-site.md).

Every field name the spider reads is produced here and nowhere else.
"""
from __future__ import annotations

from .catalog import Catalog, Product, Review

PHOTO_PATH = "/apne2/any/uploads/cards/snapshots/{photo_id}.jpg"
PRODUCT_IMAGE_PATH = "/apne2/any/uploads/productions/v1-{image_id}.jpg"


def photo_url(cdn_url: str, photo_id: str) -> str:
    return cdn_url + PHOTO_PATH.format(photo_id=photo_id)


def product_image_url(cdn_url: str, product: Product) -> str:
    return cdn_url + PRODUCT_IMAGE_PATH.format(image_id=product.image_id)


def review_json(review: Review, product: Product, cdn_url: str) -> dict:
    data = {
        "id": review.id,
        "createdAt": review.created_at_text,
        "writerNickname": review.writer,
        "review": {"starAvg": review.stars, "comment": review.comment,
                   "type": "PHOTO" if review.photo_id else "TEXT", "badges": []},
        "productionInformation": {"name": product.name, "brandName": product.brand,
                                  "explain": review.option},
        "reviewType": {"label": "포토리뷰" if review.photo_id else "일반리뷰"},
        "praiseCount": review.praise_count,
    }
    if review.photo_id:
        url = photo_url(cdn_url, review.photo_id)
        data["card"] = {"imageUrl": url, "imgUrl": url + "?w=360&h=360&c=c",
                        "imgUrlPc": url + "?w=720"}
    elif review.id % 2:  # the site does both: no card key, or "card": null
        data["card"] = None
    return data


def product_summary(catalog: Catalog, product: Product, cdn_url: str) -> dict:
    return {"id": product.id, "brandName": product.brand, "name": product.name,
            "reviewCount": catalog.review_count(product), "reviewAvg": catalog.rating(product),
            "sellingPrice": product.price,
            "originalImageUrl": product_image_url(cdn_url, product)}


def ranks_data(catalog: Catalog, category_id: str, cdn_url: str) -> dict:
    """``/_next/data/<buildId>/ko-KR/ranks.json``: category meta, then products in rank order."""
    category = catalog.categories.get(category_id)
    meta = {"id": category.id, "title": category.name} if category else None
    products = [product_summary(catalog, p, cdn_url) for p in catalog.ranked(category_id)]
    return {"pageProps": {"dehydratedState": {"mutations": [], "queries": [
        {"queryKey": ["ranks", "category", category_id], "state": {
            "data": {"category": meta}, "status": "success"}},
        {"queryKey": ["ranks", "best", category_id], "state": {
            "data": {"products": products}, "status": "success"}},
    ]}}, "__N_SSP": True}


def reviews_page(catalog: Catalog, product: Product, order: str, page: int, per: int,
                 cdn_url: str) -> dict:
    ordered = catalog.sorted_reviews(product, order)
    start = (page - 1) * per
    return {"totalCount": len(ordered),
            "reviewStarCount": {str(star): n for star, n in catalog.star_counts(product).items()},
            "reviews": [review_json(r, product, cdn_url) for r in ordered[start:start + per]]}


def star_counts(catalog: Catalog, product: Product) -> dict:
    return {f"countFor{star}": n for star, n in catalog.star_counts(product).items()}


def product_page_queries(catalog: Catalog, product: Product, cdn_url: str) -> list[dict]:
    category = catalog.categories[product.category_id]
    production = {"id": product.id, "name": product.name, "brandName": product.brand,
                  "sellingPrice": product.price,
                  "originalImageUrl": product_image_url(cdn_url, product),
                  "reviewCount": catalog.review_count(product),
                  "reviewAvg": catalog.rating(product)}
    first = catalog.sorted_reviews(product, "best")[:5]
    return [
        {"queryKey": ["production", product.id], "state": {"status": "success", "data": {
            "production": production,
            "categories": [{"id": category.id, "title": category.name}]}}},
        {"queryKey": ["review", product.id, {"page": 1, "order": "best"}], "state": {
            "status": "success", "data": {"review": {
                "reviews": [review_json(r, product, cdn_url) for r in first],
                "totalCount": catalog.review_count(product)}}}},
    ]

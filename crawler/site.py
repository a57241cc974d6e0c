"""The one adapter between the crawler and the shop's interface (store.ohou.se generation).

Every address, query parameter and field name of the shop lives here, so that a redesign of the
site is a change of this module only. Parsers turn raw bytes into plain dataclasses and raise
:class:`ParseError` (with a machine-readable reason) for anything malformed, never a crash.
"""
from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

# --- addresses ------------------------------------------------------------------------------
RANKS_PAGE_PATH = "/ranks"
RANKS_DATA_PATH = "/_next/data/{build_id}/ko-KR/ranks.json"
PRODUCT_PAGE_PATH = "/goods/{product_id}"
REVIEWS_API_PATH = "/api/goods/reviews"
# Paths the shop's WAF guards: they need the browser-obtained cookie and a same-origin Referer.
WAF_GUARDED_PREFIXES = ("/_next/data/", "/api/")
REVIEWS_ORDER_RECENT = "recent"

_NEXT_DATA_RE = re.compile(
    r'<script[^>]*\bid=["\']__NEXT_DATA__["\'][^>]*>(?P<json>.*?)</script>', re.S | re.I)
_BUILD_MANIFEST_RE = re.compile(r'/_next/static/(?P<build>[^/"\']+)/_buildManifest\.js')


class ParseError(ValueError):
    """A page or JSON document does not have the shape the adapter expects."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --- parsed shapes --------------------------------------------------------------------------
@dataclass(frozen=True)
class Category:
    id: str
    name: str | None


@dataclass(frozen=True)
class RankedProduct:
    id: int
    rank: int  # 1-based position in the best ranking
    name: str
    brand: str | None
    price: int | None
    review_count: int | None
    rating: float | None


@dataclass(frozen=True)
class Ranking:
    category: Category | None
    products: list[RankedProduct]


@dataclass(frozen=True)
class ProductPage:
    id: int
    name: str
    brand: str | None
    price: int | None
    review_count: int | None
    rating: float | None
    categories: list[Category] = field(default_factory=list)
    review_total: int | None = None


@dataclass(frozen=True)
class Review:
    id: int
    created_date: dt.date | None
    stars: float | None
    comment: str | None
    writer_nickname: str | None
    photo_url: str | None  # the photo's address without resize parameters; None: no photo


@dataclass(frozen=True)
class ReviewsPage:
    total_count: int | None
    reviews: list[Review]


# --- the adapter ----------------------------------------------------------------------------
class ShopSite:
    def __init__(self, base_url: str, image_params: str = ""):
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.netloc = parts.netloc
        self.image_params = image_params.lstrip("?")

    # addresses
    def ranks_page_url(self, category_id: str) -> str:
        return f"{self.base_url}{RANKS_PAGE_PATH}?" + urlencode(
            {"type": "best", "category_id": category_id})

    def ranks_data_url(self, build_id: str, category_id: str) -> str:
        return f"{self.base_url}{RANKS_DATA_PATH.format(build_id=build_id)}?" + urlencode(
            {"type": "best", "category_id": category_id})

    def product_page_url(self, product_id: int) -> str:
        return f"{self.base_url}{PRODUCT_PAGE_PATH.format(product_id=product_id)}"

    def reviews_url(self, product_id: int, page: int, per: int) -> str:
        return f"{self.base_url}{REVIEWS_API_PATH}?" + urlencode(
            {"productionId": product_id, "page": page, "per": per, "order": REVIEWS_ORDER_RECENT})

    def image_url(self, photo_url: str) -> str:
        """The photo at the one fixed size: its own query replaced by ``image_params``."""
        parts = urlsplit(photo_url)
        return urlunsplit((parts.scheme, parts.netloc, parts.path, self.image_params, ""))

    def is_shop_url(self, url: str) -> bool:
        return urlsplit(url).netloc == self.netloc

    def is_waf_guarded(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.netloc == self.netloc and parts.path.startswith(WAF_GUARDED_PREFIXES)

    def guarded_headers(self, referer_page: str) -> dict[str, str]:
        """Headers a same-origin JSON call carries (the WAF checks the Referer)."""
        return {"Referer": referer_page, "Accept": "application/json"}

    # parsers
    @staticmethod
    def parse_build_id(html: str) -> str:
        data = _next_data(html, required=False)
        if isinstance(data, dict) and isinstance(data.get("buildId"), str) and data["buildId"]:
            return data["buildId"]
        match = _BUILD_MANIFEST_RE.search(html)
        if match:
            return match.group("build")
        raise ParseError("no_build_id", "neither __NEXT_DATA__.buildId nor a _buildManifest.js src")

    @staticmethod
    def parse_ranking(body: bytes | str) -> Ranking:
        doc = _json(body)
        queries = _queries(_dig(doc, "pageProps", "dehydratedState", "queries"))
        category: Category | None = None
        products_raw: list | None = None
        for data in queries:
            if isinstance(data.get("category"), dict) and category is None:
                cat = data["category"]
                category = Category(id=str(_req(cat, "id")), name=_opt_str(cat.get("title")))
            if isinstance(data.get("products"), list) and products_raw is None:
                products_raw = data["products"]
        if products_raw is None:
            raise ParseError("missing_field", "no query with data.products in ranks data")
        products = []
        for position, raw in enumerate(products_raw, start=1):
            if not isinstance(raw, dict):
                raise ParseError("unexpected_shape", f"product #{position} is not an object")
            products.append(RankedProduct(
                id=_int(_req(raw, "id"), "id"), rank=position, name=str(_req(raw, "name")),
                brand=_opt_str(raw.get("brandName")), price=_opt_int(raw.get("sellingPrice")),
                review_count=_opt_int(raw.get("reviewCount")),
                rating=_opt_float(raw.get("reviewAvg"))))
        return Ranking(category=category, products=products)

    @staticmethod
    def parse_product_page(html: str) -> ProductPage:
        doc = _next_data(html, required=True)
        queries = _queries(_dig(doc, "props", "pageProps", "dehydratedState", "queries"))
        production = categories = review = None
        for data in queries:
            if production is None and isinstance(data.get("production"), dict):
                production = data["production"]
                if isinstance(data.get("categories"), list):
                    categories = data["categories"]
            if categories is None and isinstance(data.get("categories"), list):
                categories = data["categories"]
            if review is None and isinstance(data.get("review"), dict):
                review = data["review"]
        if production is None:
            raise ParseError("missing_field", "no query with data.production on the product page")
        cats = [Category(id=str(c.get("id", "")), name=_opt_str(c.get("title")))
                for c in categories or [] if isinstance(c, dict)]
        return ProductPage(
            id=_int(_req(production, "id"), "production.id"), name=str(_req(production, "name")),
            brand=_opt_str(production.get("brandName")),
            price=_opt_int(production.get("sellingPrice")),
            review_count=_opt_int(production.get("reviewCount")),
            rating=_opt_float(production.get("reviewAvg")), categories=cats,
            review_total=_opt_int((review or {}).get("totalCount")))

    @staticmethod
    def parse_reviews(body: bytes | str) -> ReviewsPage:
        doc = _json(body)
        if not isinstance(doc, dict):
            raise ParseError("unexpected_shape", "reviews answer is not an object")
        raw_reviews = doc.get("reviews")
        if not isinstance(raw_reviews, list):
            raise ParseError("missing_field", "reviews answer has no reviews list")
        reviews = []
        for n, raw in enumerate(raw_reviews):
            if not isinstance(raw, dict):
                raise ParseError("unexpected_shape", f"review #{n} is not an object")
            body_ = raw.get("review") if isinstance(raw.get("review"), dict) else {}
            card = raw.get("card") if isinstance(raw.get("card"), dict) else {}
            photo = card.get("imageUrl") or card.get("imgUrl") or card.get("imgUrlPc")
            if photo is not None and not isinstance(photo, str):
                raise ParseError("unexpected_shape", f"review {raw.get('id')} card url is not text")
            if photo:  # the same photo is offered at several sizes: keep the bare address
                parts = urlsplit(photo)
                photo = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
            reviews.append(Review(
                id=_int(_req(raw, "id"), "review id"),
                created_date=_date(raw.get("createdAt")),
                stars=_opt_float(body_.get("starAvg")), comment=_opt_str(body_.get("comment")),
                writer_nickname=_opt_str(raw.get("writerNickname")), photo_url=photo or None))
        return ReviewsPage(total_count=_opt_int(doc.get("totalCount")), reviews=reviews)


# --- helpers --------------------------------------------------------------------------------
def _json(body: bytes | str) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        head = body[:60] if isinstance(body, str) else body[:60].decode("utf-8", "replace")
        raise ParseError("invalid_json", f"{exc} (starts {head!r})") from None


def _next_data(html: str, required: bool) -> Any:
    match = _NEXT_DATA_RE.search(html)
    if not match:
        if required:
            raise ParseError("invalid_html", "no script#__NEXT_DATA__ in the page")
        return None
    try:
        return json.loads(match.group("json"))
    except ValueError as exc:
        if required:
            raise ParseError("invalid_json", f"__NEXT_DATA__: {exc}") from None
        return None


def _dig(doc: Any, *path: str) -> Any:
    node = doc
    for key in path:
        if not isinstance(node, dict) or key not in node:
            raise ParseError("missing_field", ".".join(path))
        node = node[key]
    return node


def _queries(queries: Any) -> list[dict]:
    if not isinstance(queries, list):
        raise ParseError("unexpected_shape", "dehydratedState.queries is not a list")
    out = []
    for q in queries:
        data = q.get("state", {}).get("data") if isinstance(q, dict) else None
        if isinstance(data, dict):
            out.append(data)
    return out


def _req(obj: dict, key: str) -> Any:
    if obj.get(key) is None:
        raise ParseError("missing_field", key)
    return obj[key]


def _int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ParseError("unexpected_shape", f"{name} is not an integer: {value!r}") from None


def _opt_int(value: Any) -> int | None:
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def _opt_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _date(value: Any) -> dt.date | None:
    if not isinstance(value, str):
        return None
    for fmt in ("%Y.%m.%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value.strip()[:10], fmt).date()
        except ValueError:
            continue
    return None

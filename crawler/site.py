"""The one adapter between the crawler and the shop's interface (store.ohou.se generation).

Every address, query parameter and field name of the shop lives here, so that a redesign of the
site is a change of this module only. Parsers turn raw bytes into plain dataclasses and raise
:class:`ParseError` (with a machine-readable reason) for anything malformed, never any other
exception: the shop's answers are untrusted input (tests/test_site_properties.py holds that for
arbitrary JSON and HTML). One malformed entry of a list (a product of the ranking, a review of a
page) is set aside with its reason instead of failing the whole answer.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit, urlunsplit

# --- addresses ------------------------------------------------------------------------------
RANKS_PAGE_PATH = "/ranks"
RANKS_DATA_PATH = "/_next/data/{build_id}/ko-KR/ranks.json"
PRODUCT_PAGE_PATH = "/goods/{product_id}"
REVIEWS_API_PATH = "/api/goods/reviews"
# Paths the shop's WAF guards: they need the browser-obtained cookie and a same-origin Referer.
WAF_GUARDED_PREFIXES = ("/_next/data/", "/api/")
# How the WAF refuses a guarded call: 401/403 ("Access Denied"), or an HTML page in place of the
# JSON, whatever its status, that sets the cookie by script (its JS challenge) or says access is
# denied. An HTML page without these (a maintenance page) stays an ``invalid_json`` answer.
WAF_REFUSAL_STATUSES = (401, 403)
WAF_CHALLENGE_MARKERS = (b"document.cookie", b"access denied")
WAF_CHALLENGE_SCAN_BYTES = 64 * 1024
REVIEWS_ORDER_RECENT = "recent"

# A Next.js buildId is a short token; anything else (a path, a query) must never reach a URL.
_BUILD_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_BUILD_MANIFEST_SRC_RE = re.compile(r"/_next/static/(?P<build>[^/\"']+)/_buildManifest\.js")
_SURROGATES_RE = re.compile("[\ud800-\udfff]")
_CONTROL_OR_SURROGATE_RE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")
PHOTO_SCHEMES = ("http", "https")
MAX_URL_LENGTH = 2048
# The reason a product's unusable ``originalImageUrl`` is recorded under (the product is kept).
BAD_CATALOGUE_IMAGE_URL = "bad_catalogue_image_url"

# The manifest's column ranges (shoplens/manifest/migrations/versions/0001_crawl.py).
BIGINT_MAX = 2 ** 63 - 1  # BigInteger: product and review ids, prices
INT_MAX = 2 ** 31 - 1  # Integer: review counts


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
    # The shop's own image of the product (``originalImageUrl``), absolute and without resize
    # parameters; None: none given. ``image_error``: why the given one is not usable (the
    # product itself is kept).
    image_url: str | None = None
    image_error: ParseError | None = None


@dataclass(frozen=True)
class RejectedEntry:
    """One entry of a list the adapter could not use, and why (a ``crawl_failures`` row)."""
    position: int  # 1-based position in the shop's list
    reason: str
    detail: str
    entry_id: int | None = None  # the entry's own id where it had a usable one


@dataclass(frozen=True)
class Ranking:
    category: Category | None
    products: list[RankedProduct]
    rejected: list[RejectedEntry] = field(default_factory=list)


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
    image_url: str | None = None  # as RankedProduct.image_url
    image_error: ParseError | None = None


@dataclass(frozen=True)
class Review:
    id: int
    created_date: dt.date | None
    stars: float | None
    comment: str | None
    writer_nickname: str | None
    photo_url: str | None  # the photo's absolute address without resize parameters; None: none
    # Why the review's photo address was not usable (the review itself is kept); None: fine.
    photo_error: ParseError | None = None


@dataclass(frozen=True)
class ReviewsPage:
    total_count: int | None
    reviews: list[Review]
    rejected: list[RejectedEntry] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """How many reviews the shop listed on this page, usable or not."""
        return len(self.reviews) + len(self.rejected)


# --- the adapter ----------------------------------------------------------------------------
class ShopSite:
    def __init__(self, base_url: str, image_params: str = ""):
        self.base_url = base_url.rstrip("/")
        parts = urlsplit(self.base_url)
        self.scheme = parts.scheme
        self.netloc = parts.netloc
        self.image_params = image_params.lstrip("?")

    # addresses
    def ranks_page_url(self, category_id: str) -> str:
        return f"{self.base_url}{RANKS_PAGE_PATH}?" + urlencode(
            {"type": "best", "category_id": category_id})

    def ranks_data_url(self, build_id: str, category_id: str) -> str:
        if not _BUILD_ID_RE.fullmatch(build_id):
            raise ParseError("bad_build_id", f"buildId {build_id[:80]!r} is not a plain token")
        return f"{self.base_url}{RANKS_DATA_PATH.format(build_id=build_id)}?" + urlencode(
            {"type": "best", "category_id": category_id})

    def product_page_url(self, product_id: int) -> str:
        return f"{self.base_url}{PRODUCT_PAGE_PATH.format(product_id=int(product_id))}"

    def reviews_url(self, product_id: int, page: int, per: int) -> str:
        return f"{self.base_url}{REVIEWS_API_PATH}?" + urlencode(
            {"productionId": product_id, "page": page, "per": per, "order": REVIEWS_ORDER_RECENT})

    def image_url(self, photo_url: str) -> str:
        """The photo at the one fixed size: its own query replaced by ``image_params``.

        ``photo_url`` may come from the manifest (an older night's parser stored it): it is
        checked again, so a stored bad address is a :class:`ParseError`, never a crash. The
        address is stored as the shop served it; only the request is upgraded to https.
        """
        parts = urlsplit(self.photo_address(photo_url, self.base_url + "/"))
        scheme, netloc = parts.scheme, parts.netloc
        if self.scheme == "https" and scheme == "http":
            # An https shop's http photo is fetched as browsers fetch mixed content (upgraded to
            # https, port 80 becoming 443): the crawl then needs only the shop's scheme.
            scheme = "https"
            if parts.port == 80:
                netloc = netloc.rsplit(":", 1)[0]
        return urlunsplit((scheme, netloc, parts.path, self.image_params, ""))

    @staticmethod
    def photo_address(raw: Any, page_url: str, reason: str = "bad_photo_url") -> str:
        """``raw`` resolved against the page that listed it (``//host/a.jpg``, ``/img/a.jpg``),
        without resize parameters; http(s) with a host and a valid port only, else a
        :class:`ParseError` with ``reason``."""
        if not isinstance(raw, str):
            raise ParseError(reason, f"image address is not text: {_short(raw)}")
        text = raw.strip()
        if not text or len(text) > MAX_URL_LENGTH or _has_control(text):
            raise ParseError(reason, f"image address {text[:80]!r} is empty, too long "
                                     "or has control characters")
        try:
            parts = urlsplit(urljoin(page_url, text))
            port = parts.port  # raises ValueError when out of range or not a number
        except ValueError as exc:
            raise ParseError(reason, f"{text[:80]!r}: {exc}") from None
        if parts.scheme not in PHOTO_SCHEMES or not parts.hostname:
            raise ParseError(reason, f"{text[:80]!r} is not an http(s) address with a host")
        if parts.username is not None or parts.password is not None or port == 0:
            raise ParseError(reason, f"{text[:80]!r} carries credentials or port 0")
        return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))

    @classmethod
    def catalogue_image(cls, raw: Any, page_url: str) -> tuple[str | None, ParseError | None]:
        """A product's ``originalImageUrl`` as (address, None), (None, why it is unusable), or
        (None, None) when the shop gave none (absent, null or empty)."""
        if raw is None or raw == "":
            return None, None
        try:
            return cls.photo_address(raw, page_url, reason=BAD_CATALOGUE_IMAGE_URL), None
        except ParseError as exc:
            return None, exc

    def is_shop_url(self, url: str) -> bool:
        return urlsplit(url).netloc == self.netloc

    def is_waf_guarded(self, url: str) -> bool:
        parts = urlsplit(url)
        return parts.netloc == self.netloc and parts.path.startswith(WAF_GUARDED_PREFIXES)

    def is_waf_challenge(self, url: str, status: int, content_type: str | None,
                         body: bytes) -> bool:
        """Whether this answer to ``url`` is the WAF asking for its cookie (a refusal status
        or a challenge page) rather than the shop's own answer."""
        if not self.is_waf_guarded(url):
            return False
        if status in WAF_REFUSAL_STATUSES:
            return True
        head = body[:WAF_CHALLENGE_SCAN_BYTES]
        is_html = "html" in (content_type or "").lower() or head.lstrip()[:1] == b"<"
        return is_html and any(marker in head.lower() for marker in WAF_CHALLENGE_MARKERS)

    def guarded_headers(self, referer_page: str) -> dict[str, str]:
        """Headers a same-origin JSON call carries (the WAF checks the Referer)."""
        return {"Referer": referer_page, "Accept": "application/json"}

    # parsers
    @staticmethod
    def parse_build_id(html: str) -> str:
        selector = _html(html)
        data = _next_data(selector, required=False)
        build = data.get("buildId") if isinstance(data, dict) else None
        if build is None:
            for src in selector.css("script::attr(src)").getall():
                match = _BUILD_MANIFEST_SRC_RE.search(src)
                if match:
                    build = match.group("build")
                    break
        if build is None:
            raise ParseError("no_build_id", "neither __NEXT_DATA__.buildId nor a _buildManifest.js src")
        if not isinstance(build, str) or not _BUILD_ID_RE.fullmatch(build):
            raise ParseError("bad_build_id", f"buildId {_short(build)} is not a plain token")
        return build

    def parse_ranking(self, body: bytes | str, page_url: str | None = None) -> Ranking:
        """The ranks data; image addresses are resolved against ``page_url``."""
        page_url = page_url or self.base_url + "/"
        doc = _json(body)
        queries = _queries(_dig(doc, "pageProps", "dehydratedState", "queries"))
        category: Category | None = None
        products_raw: list | None = None
        for data in queries:
            if isinstance(data.get("category"), dict) and category is None:
                cat = data["category"]
                category = Category(id=_text(_req(cat, "id"), "category.id"),
                                    name=_opt_text(cat.get("title"), "category.title"))
            if isinstance(data.get("products"), list) and products_raw is None:
                products_raw = data["products"]
        if products_raw is None:
            raise ParseError("missing_field", "no query with data.products in ranks data")
        products, rejected, seen = [], [], set()
        for position, raw in enumerate(products_raw, start=1):
            try:
                if not isinstance(raw, dict):
                    raise ParseError("unexpected_shape", f"product #{position} is not an object")
                image_url, image_error = self.catalogue_image(raw.get("originalImageUrl"),
                                                              page_url)
                product = RankedProduct(
                    id=_id(_req(raw, "id"), "product id"), rank=position,
                    name=_text(_req(raw, "name"), "name"),
                    brand=_opt_text(raw.get("brandName"), "brandName"),
                    price=_opt_int(raw.get("sellingPrice"), "sellingPrice", BIGINT_MAX),
                    review_count=_opt_int(raw.get("reviewCount"), "reviewCount", INT_MAX),
                    rating=_opt_float(raw.get("reviewAvg"), "reviewAvg"),
                    image_url=image_url, image_error=image_error)
                if product.id in seen:
                    raise ParseError("duplicate_id", f"product {product.id} listed twice")
            except ParseError as exc:
                rejected.append(RejectedEntry(position, exc.reason, exc.detail,
                                              _usable_id(raw)))
                continue
            seen.add(product.id)
            products.append(product)
        return Ranking(category=category, products=products, rejected=rejected)

    def parse_product_page(self, html: str, page_url: str | None = None) -> ProductPage:
        """The product page; its image address is resolved against ``page_url``."""
        page_url = page_url or self.base_url + "/"
        doc = _next_data(_html(html), required=True)
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
        image_url, image_error = self.catalogue_image(production.get("originalImageUrl"),
                                                      page_url)
        cats = [Category(id=_text(c.get("id", ""), "categories.id"),
                         name=_opt_text(c.get("title"), "categories.title"))
                for c in categories or [] if isinstance(c, dict)]
        return ProductPage(
            id=_id(_req(production, "id"), "production.id"),
            name=_text(_req(production, "name"), "production.name"),
            brand=_opt_text(production.get("brandName"), "production.brandName"),
            price=_opt_int(production.get("sellingPrice"), "production.sellingPrice", BIGINT_MAX),
            review_count=_opt_int(production.get("reviewCount"), "production.reviewCount",
                                  INT_MAX),
            rating=_opt_float(production.get("reviewAvg"), "production.reviewAvg"),
            categories=cats,
            review_total=_opt_int((review or {}).get("totalCount"), "review.totalCount", INT_MAX),
            image_url=image_url, image_error=image_error)

    def parse_reviews(self, body: bytes | str, page_url: str | None = None) -> ReviewsPage:
        """One page of the reviews API; photo addresses are resolved against ``page_url``."""
        page_url = page_url or self.base_url + "/"
        doc = _json(body)
        if not isinstance(doc, dict):
            raise ParseError("unexpected_shape", "reviews answer is not an object")
        raw_reviews = doc.get("reviews")
        if not isinstance(raw_reviews, list):
            raise ParseError("missing_field", "reviews answer has no reviews list")
        total = _opt_int(doc.get("totalCount"), "totalCount", INT_MAX)
        reviews, rejected, seen = [], [], set()
        for position, raw in enumerate(raw_reviews, start=1):
            try:
                review = self._review(raw, position, page_url)
                if review.id in seen:
                    raise ParseError("duplicate_review_id",
                                     f"review {review.id} appears twice on one page")
            except ParseError as exc:
                rejected.append(RejectedEntry(position, exc.reason, exc.detail, _usable_id(raw)))
                continue
            seen.add(review.id)
            reviews.append(review)
        return ReviewsPage(total_count=total, reviews=reviews, rejected=rejected)

    def _review(self, raw: Any, position: int, page_url: str) -> Review:
        if not isinstance(raw, dict):
            raise ParseError("unexpected_shape", f"review #{position} is not an object")
        review_id = _id(_req(raw, "id"), "review id")
        body_ = raw.get("review") if isinstance(raw.get("review"), dict) else {}
        card = raw.get("card") if isinstance(raw.get("card"), dict) else {}
        photo_raw = next((card[k] for k in ("imageUrl", "imgUrl", "imgUrlPc")
                          if card.get(k) not in (None, "")), None)
        photo = photo_error = None
        if photo_raw is not None:  # the same photo is offered at several sizes: keep the bare one
            try:
                photo = self.photo_address(photo_raw, page_url)
            except ParseError as exc:
                photo_error = exc
        return Review(
            id=review_id, created_date=_date(raw.get("createdAt")),
            stars=_opt_float(body_.get("starAvg"), "review.starAvg"),
            comment=_opt_text(body_.get("comment"), "review.comment"),
            writer_nickname=_opt_text(raw.get("writerNickname"), "writerNickname"),
            photo_url=photo, photo_error=photo_error)


# --- helpers --------------------------------------------------------------------------------
def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a repr of hostile data must not fail the parse
        text = f"<{type(value).__name__}>"
    return text[:80]


def _has_control(text: str) -> bool:
    # One regex scan: a per-character loop here was ~4 % of the crawl's reactor-thread CPU.
    return _CONTROL_OR_SURROGATE_RE.search(text) is not None


def _reject_constant(name: str) -> Any:
    raise ParseError("invalid_json", f"non-standard JSON constant {name}")


def _json(body: bytes | str) -> Any:
    try:
        # NaN/Infinity are not JSON; 1e400 overflows to inf and is refused where it is read.
        return json.loads(body, parse_constant=_reject_constant)
    except ParseError:
        raise
    except (ValueError, UnicodeDecodeError, RecursionError, TypeError) as exc:
        head = body[:60] if isinstance(body, str) else body[:60].decode("utf-8", "replace")
        raise ParseError("invalid_json", f"{type(exc).__name__}: {str(exc)[:200]} "
                                         f"(starts {head!r})") from None


def _html(html: str):
    """A parsel selector over the page (lxml: linear in the page, unlike a backtracking regex)."""
    from lxml import etree
    from parsel import Selector

    if not isinstance(html, str):
        raise ParseError("invalid_html", "page is not text")
    try:
        # NUL and lone surrogates make lxml refuse the text; they are never part of the markup.
        return Selector(text=_SURROGATES_RE.sub("\ufffd", html.replace("\x00", "")) or " ")
    except (ValueError, TypeError, etree.LxmlError) as exc:
        raise ParseError("invalid_html", f"{type(exc).__name__}: {str(exc)[:200]}") from None


def _next_data(selector, required: bool) -> Any:
    from lxml import etree

    try:
        text = selector.css('script[id="__NEXT_DATA__"]::text').get()
    except (ValueError, TypeError, etree.LxmlError) as exc:
        raise ParseError("invalid_html", f"{type(exc).__name__}: {str(exc)[:200]}") from None
    if text is None:
        if required:
            raise ParseError("invalid_html", "no script#__NEXT_DATA__ in the page")
        return None
    try:
        return _json(text)
    except ParseError as exc:
        if required:
            raise ParseError("invalid_json", f"__NEXT_DATA__: {exc.detail}") from None
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
        state = q.get("state") if isinstance(q, dict) else None
        data = state.get("data") if isinstance(state, dict) else None
        if isinstance(data, dict):
            out.append(data)
    return out


def _req(obj: dict, key: str) -> Any:
    if obj.get(key) is None:
        raise ParseError("missing_field", key)
    return obj[key]


def _int(value: Any, name: str, maximum: int, minimum: int = 0) -> int:
    """An integer as JSON or as digits; never a bool, a fraction or a float (1.9 is not 1)."""
    if isinstance(value, str):
        digits = value.strip()
        if not (digits.isascii() and digits.isdigit()):
            raise ParseError("unexpected_shape", f"{name} is not an integer: {_short(value)}")
        if len(digits) > 19:  # beyond any column, and int() refuses very long strings
            raise ParseError("out_of_range", f"{name} has {len(digits)} digits")
        value = int(digits)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParseError("unexpected_shape", f"{name} is not an integer: {_short(value)}")
    if not minimum <= value <= maximum:
        raise ParseError("out_of_range", f"{name} {_short(value)} outside {minimum}..{maximum}")
    return value


def _id(value: Any, name: str) -> int:
    return _int(value, name, BIGINT_MAX, minimum=1)


def _opt_int(value: Any, name: str, maximum: int) -> int | None:
    return None if value is None else _int(value, name, maximum)


def _opt_float(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParseError("unexpected_shape", f"{name} is not a number: {_short(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise ParseError("out_of_range", f"{name} is not finite: {_short(value)}")
    return number


def _text(value: Any, name: str) -> str:
    """Text for a Text column: NUL removed and lone surrogates replaced (PostgreSQL stores
    neither); numbers become their digits, anything else is a shape error."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ParseError("unexpected_shape", f"{name} is not text: {_short(value)}")
    text = str(value)
    return _SURROGATES_RE.sub("\ufffd", text.replace("\x00", ""))


def _opt_text(value: Any, name: str) -> str | None:
    return None if value is None else _text(value, name)


def _usable_id(raw: Any) -> int | None:
    """The entry's id for its failure row, when it has a storable one."""
    if not isinstance(raw, dict):
        return None
    try:
        return _id(raw.get("id"), "id")
    except ParseError:
        return None


def _date(value: Any) -> dt.date | None:
    if not isinstance(value, str):
        return None
    for fmt in ("%Y.%m.%d", "%Y-%m-%d"):
        try:
            return dt.datetime.strptime(value.strip()[:10], fmt).date()
        except ValueError:
            continue
    return None

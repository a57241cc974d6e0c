"""The replica's catalogue: products, reviews and photos, deterministic per seed.

Built from :class:`ProductSource` rows (each photo becomes one photo review); everything the
sources do not say (ids, Korean names, brands, prices, stars, dates, nicknames, comments, reviews
without photos) is drawn from RNGs keyed by the seed and the product's stable key, so the same
inputs and seed always give the same shop, whatever order the sources came in.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import korean
from .listings import ProductSource

BAD_KINDS = ("bomb", "not_image", "truncated_file", "wrong_type")
FIRST_REVIEW_DAY = dt.date(2024, 1, 1)
LAST_REVIEW_DAY = dt.date(2026, 8, 31)


@dataclass
class Review:
    id: int
    product_id: int
    created_at: dt.date
    stars: int
    comment: str
    writer: str
    praise_count: int
    option: str
    photo_id: str | None = None  # 18 digits, the CDN file name
    photo_path: Path | None = None
    bad: str | None = None  # one of BAD_KINDS when the photo is permanently broken
    published: bool = True

    @property
    def created_at_text(self) -> str:
        return self.created_at.strftime("%Y.%m.%d")


@dataclass
class Product:
    id: int
    category_id: str
    name: str
    brand: str
    price: int
    image_id: str  # 15 digits, the catalogue image on the CDN
    key: str
    reviews: list[Review] = field(default_factory=list)  # every review, published or held back
    # None, or a bad-photo kind (cdn.bad_photo_body) its catalogue image is served as; set by a
    # test on the running shop (``shop.catalog.products[id].image_bad = "truncated_file"``).
    image_bad: str | None = None


@dataclass
class Category:
    id: str
    name: str
    product_ids: list[int] = field(default_factory=list)


class CatalogError(ValueError):
    """The catalogue cannot be built as asked (e.g. more held back than there are photos)."""


class Catalog:
    """The shop's current state; ``release`` publishes held-back reviews."""

    def __init__(self, seed: int, categories: dict[str, Category], products: dict[int, Product]):
        self.seed = seed
        self.categories = categories
        self.products = products
        self.photos: dict[str, Review] = {r.photo_id: r for p in products.values()
                                          for r in p.reviews if r.photo_id}
        self.by_image_id: dict[str, Product] = {p.image_id: p for p in products.values()}
        self.build_id = build_id_for(seed, 0)
        self.deploys = 0
        self._cache: dict[tuple, object] = {}

    # --- derived views (cached until the next release) --------------------------------------
    def _cached(self, key: tuple, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def published(self, product: Product) -> list[Review]:
        return self._cached(("published", product.id),
                            lambda: [r for r in product.reviews if r.published])

    def review_count(self, product: Product) -> int:
        return len(self.published(product))

    def photo_review_count(self, product: Product) -> int:
        return sum(1 for r in self.published(product) if r.photo_id)

    def rating(self, product: Product) -> float:
        reviews = self.published(product)
        return round(sum(r.stars for r in reviews) / len(reviews), 1) if reviews else 0.0

    def star_counts(self, product: Product) -> dict[int, int]:
        counts = {star: 0 for star in (5, 4, 3, 2, 1)}
        for review in self.published(product):
            counts[review.stars] += 1
        return counts

    def ranked(self, category_id: str) -> list[Product]:
        """Best-N order: popularity = published review count, ties by product id."""
        def compute():
            category = self.categories.get(category_id)
            if category is None:
                return []
            products = [self.products[pid] for pid in category.product_ids]
            return sorted(products, key=lambda p: (-self.review_count(p), p.id))
        return self._cached(("ranked", category_id), compute)

    def rank_of(self, product: Product) -> int:
        return self.ranked(product.category_id).index(product) + 1

    def sorted_reviews(self, product: Product, order: str) -> list[Review]:
        def compute():
            reviews = self.published(product)
            if order == "recent":
                return sorted(reviews, key=lambda r: (r.created_at, r.id), reverse=True)
            return sorted(reviews, key=lambda r: (-r.praise_count, -r.id))
        return self._cached(("sorted", product.id, order), compute)

    # --- hold-back ----------------------------------------------------------------------------
    def held_back(self) -> list[Review]:
        reviews = [r for p in self.products.values() for r in p.reviews if not r.published]
        return sorted(reviews, key=lambda r: r.id)

    def release(self, count: int) -> list[int]:
        """Publish the ``count`` oldest held-back reviews; returns their ids."""
        released = self.held_back()[:max(count, 0)]
        for review in released:
            review.published = True
        self._cache.clear()
        return [r.id for r in released]

    def deploy(self) -> str:
        """A new site build: the old buildId stops answering."""
        self.deploys += 1
        self.build_id = build_id_for(self.seed, self.deploys)
        return self.build_id


def build_id_for(seed: int, deploy: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
    digest = hashlib.sha256(f"build:{seed}:{deploy}".encode()).digest()
    return "".join(alphabet[b % len(alphabet)] for b in digest[:21])


def _unique(rng: random.Random, low: int, high: int, taken: set[int]) -> int:
    while True:
        value = rng.randrange(low, high)
        if value not in taken:
            taken.add(value)
            return value


def _stars(rng: random.Random, quality: float) -> int:
    weights = [0.02, 0.03, 0.08 + 0.1 * (1 - quality), 0.3, 0.5 + 0.3 * quality]
    return rng.choices([1, 2, 3, 4, 5], weights=weights)[0]


def build_catalog(sources: list[ProductSource], seed: int = 0, bad_photos: float = 0.0,
                  hold_back: int = 0) -> Catalog:
    if not sources:
        raise CatalogError("no products to sell")
    if not 0.0 <= bad_photos <= 1.0:
        raise CatalogError(f"--bad-photos must be a fraction in [0, 1], got {bad_photos}")
    sources = sorted(sources, key=lambda s: (s.category_id, s.key))
    keys = [s.key for s in sources]
    if len(set(keys)) != len(keys):
        raise CatalogError("two products share a category and name")
    categories: dict[str, Category] = {}
    products: dict[int, Product] = {}
    product_ids: set[int] = set()
    photo_ids: set[int] = set()
    image_ids: set[int] = set()
    drafts: list[tuple[random.Random, Review]] = []
    span = (LAST_REVIEW_DAY - FIRST_REVIEW_DAY).days
    for source in sources:
        rng = random.Random(f"product:{seed}:{source.key}")
        category = categories.setdefault(source.category_id,
                                         Category(source.category_id, source.category))
        product = Product(
            id=_unique(rng, 100_000, 100_000_000, product_ids), category_id=source.category_id,
            name=source.name or korean.product_name(rng, source.category),
            brand=rng.choice(korean.BRANDS), price=rng.randrange(29, 9_990) * 100,
            image_id=str(_unique(rng, 10**14, 10**15, image_ids)), key=source.key)
        category.product_ids.append(product.id)
        products[product.id] = product
        quality = rng.random()
        launch = rng.randrange(0, span // 2)
        text_only = rng.randint(1, max(2, len(source.photos) // 3)) if source.photos \
            else rng.randint(1, 6)
        photo_paths: list[Path | None] = list(source.photos) + [None] * text_only
        for index, path in enumerate(photo_paths):
            review_rng = random.Random(f"review:{seed}:{source.key}:{index}")
            stars = _stars(review_rng, quality)
            review = Review(
                id=0, product_id=product.id,
                created_at=FIRST_REVIEW_DAY + dt.timedelta(days=review_rng.randint(launch, span)),
                stars=stars, comment=korean.comment(review_rng, stars),
                writer=korean.nickname(review_rng), praise_count=int(review_rng.paretovariate(1.5)) - 1,
                option=review_rng.choice(korean.OPTIONS))
            if path is not None:
                review.photo_id = str(_unique(rng, 10**17, 10**18, photo_ids))
                review.photo_path = Path(path)
            drafts.append((review_rng, review))
            product.reviews.append(review)
    # Review ids grow with the date across the whole shop (newer = larger), like a sequence.
    drafts.sort(key=lambda d: (d[1].created_at, d[1].product_id, d[0].random()))
    id_rng = random.Random(f"review-ids:{seed}")
    next_id = 1_000_000 + id_rng.randrange(0, 500_000)
    for _, review in drafts:
        review.id = next_id
        next_id += id_rng.randint(1, 60)
    photo_reviews = [review for _, review in drafts if review.photo_id]
    _mark_bad_photos(photo_reviews, bad_photos, seed)
    if hold_back:
        if hold_back < 0 or hold_back > len(photo_reviews):
            raise CatalogError(f"--hold-back {hold_back}: the shop has {len(photo_reviews)} photo "
                               "reviews")
        for review in sorted(photo_reviews, key=lambda r: r.id)[-hold_back:]:
            review.published = False
    return Catalog(seed, categories, products)


def _mark_bad_photos(photo_reviews: list[Review], fraction: float, seed: int) -> None:
    count = round(fraction * len(photo_reviews))
    if not count:
        return
    rng = random.Random(f"bad-photos:{seed}")
    chosen = rng.sample(sorted(photo_reviews, key=lambda r: r.id), count)
    for index, review in enumerate(sorted(chosen, key=lambda r: r.id)):
        review.bad = BAD_KINDS[index % len(BAD_KINDS)]

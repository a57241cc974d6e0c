"""Every write (and the few reads) the crawl stage does on the PostgreSQL manifest.

All writes are idempotent upserts (``INSERT ... ON CONFLICT``), so a retried task, a rerun after a
crash or two overlapping attempts converge on the same rows. Run provenance: ``first_seen_run`` is
written once, ``last_seen_run`` moves forward. A run's counts are the crawl section of the one
run summary (:mod:`shoplens.summary`).
"""
from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, insert

from crawler import site
from crawler.images import CONTENT_REJECTIONS
from shoplens.manifest import engine_for
from shoplens.manifest.schema import (catalogue_images, categories, crawl_failures, crawl_runs,
                                      images, product_ranks, products, review_photos, reviews)


class RunNotFound(LookupError):
    """No crawl run has this run key (start_run was not called)."""


@dataclass
class ProductState:
    """What the manifest already knows about one product's reviews and photos."""
    reviews_synced_run: int | None = None
    # Reviews known at the product's last complete walk: paging stops once it reaches one.
    known_at_sync: set[int] = field(default_factory=set)
    known: set[int] = field(default_factory=set)  # every review of the product in the manifest
    reviews_with_photo_stored: set[int] = field(default_factory=set)
    # Reviews whose photo an earlier run downloaded and rejected as not a usable image (after
    # in-run retries): not downloaded again every night.
    photos_rejected: set[int] = field(default_factory=set)
    # Known reviews whose photo is not stored yet (an earlier failure): (review_id, photo_url).
    photos_missing: list[tuple[int, str]] = field(default_factory=list)
    # The ranking's (review count, rating) in the run of the last complete walk, None if unknown.
    ranked_at_sync: tuple[int | None, float | None] | None = None
    # Days from the start of the last complete walk's run to the start of this run.
    days_since_sync: float | None = None
    # A failure was recorded for the product in or after the run of its last complete walk.
    failed_since_sync: bool = False
    # The address of the product's stored catalogue image (None: none stored yet).
    catalogue_url: str | None = None
    # Catalogue image URLs (as requested) whose bytes an earlier run refused: not asked again.
    catalogue_refused: set[str] = field(default_factory=set)

    def unchanged_since_sync(self, review_count: int | None, rating: float | None,
                             recheck_days: float) -> bool:
        """True when walking the product again would find nothing new, as far as the ranking
        shows: its review count and rating are those of the last complete walk, that walk is
        younger than ``recheck_days`` and nothing failed for the product since."""
        return (self.reviews_synced_run is not None and not self.failed_since_sync
                and review_count is not None and self.ranked_at_sync == (review_count, rating)
                and self.days_since_sync is not None and self.days_since_sync < recheck_days)


@dataclass(frozen=True)
class PhotoRow:
    """A stored photo's facts, as its ``images`` and ``review_photos`` rows need them."""
    sha256: str
    object_key: str
    size_bytes: int
    width: int
    height: int
    format: str
    source_url: str
    review_id: int
    product_id: int


@dataclass(frozen=True)
class CatalogueImageRow:
    """A stored catalogue image's facts, as its ``catalogue_images`` row needs them."""
    product_id: int
    sha256: str
    object_key: str
    source_url: str  # the shop's address of the image (originalImageUrl, resolved, no params)
    size_bytes: int
    width: int
    height: int
    format: str


@dataclass(frozen=True)
class FailureRecord:
    stage: str
    reason: str
    url: str
    detail: str | None = None
    category_id: str | None = None
    product_id: int | None = None
    review_id: int | None = None


class ManifestWriter:
    def __init__(self, manifest_url: str, run_id: int):
        self.engine = engine_for(manifest_url)
        self.run_id = run_id

    @classmethod
    def for_run_key(cls, manifest_url: str, run_key: str) -> "ManifestWriter":
        return cls(manifest_url, ensure_run_id(manifest_url, run_key))

    # --- ranking and products ---------------------------------------------------------------
    def record_ranking(self, category_id: str, category_name: str | None, ranking_url: str,
                       ranked: list[site.RankedProduct], product_url_for) -> None:
        """Category, its best-N products and this run's rank rows, in one transaction."""
        with self.engine.begin() as conn:
            conn.execute(_UPSERT_CATEGORY, dict(
                id=category_id, name=category_name, source_url=ranking_url,
                first_seen_run=self.run_id, last_seen_run=self.run_id))
            if not ranked:
                return
            conn.execute(_UPSERT_PRODUCT, [self._product_row(
                category_id, p.id, p.name, p.brand, p.price, p.rank, p.review_count, p.rating,
                product_url_for(p.id)) for p in ranked])
            conn.execute(_UPSERT_PRODUCT_RANK, [dict(
                run_id=self.run_id, product_id=p.id, category_id=category_id, rank=p.rank,
                review_count=p.review_count, rating=p.rating, source_url=ranking_url)
                for p in ranked])

    def record_product_page(self, category_id: str, rank: int, page: site.ProductPage,
                            url: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(_UPSERT_PRODUCT, self._product_row(
                category_id, page.id, page.name, page.brand, page.price, rank,
                page.review_count, page.rating, url))

    def _product_row(self, category_id, product_id, name, brand, price, rank, review_count,
                     rating, url) -> dict:
        return dict(id=product_id, category_id=category_id, name=name, brand=brand, price=price,
                    rank=rank, review_count=review_count, rating=rating, source_url=url,
                    first_seen_run=self.run_id, last_seen_run=self.run_id)

    def product_states(self, product_ids: Iterable[int]) -> dict[int, ProductState]:
        ids = list(product_ids)
        states = {pid: ProductState() for pid in ids}
        if not ids:
            return states
        with self.engine.connect() as conn:
            synced_run, this_run = crawl_runs.alias("synced_run"), crawl_runs.alias("this_run")
            at_sync = product_ranks.alias("at_sync")
            days = sa.extract("epoch", this_run.c.started_at - synced_run.c.started_at) / 86400.0
            # Any failure of the product in or after its last complete walk (a page that failed,
            # a review or photo address rejected on a page): the walk is asked for again, so it
            # is recorded again or heals. Photos refused for their content are never refetched.
            walk_failed = sa.exists().where(
                crawl_failures.c.product_id == products.c.id,
                crawl_failures.c.stage != "ranking",
                crawl_failures.c.reason.not_in(sorted(CONTENT_REJECTIONS)),
                crawl_failures.c.run_id >= products.c.reviews_synced_run)
            last_walk = sa.select(
                products.c.id, products.c.reviews_synced_run, at_sync.c.run_id,
                at_sync.c.review_count, at_sync.c.rating, days, walk_failed).select_from(
                products.outerjoin(synced_run, synced_run.c.id == products.c.reviews_synced_run)
                .outerjoin(this_run, this_run.c.id == self.run_id)
                .outerjoin(at_sync, sa.and_(at_sync.c.run_id == products.c.reviews_synced_run,
                                            at_sync.c.product_id == products.c.id))
            ).where(products.c.id.in_(ids))
            for pid, synced, ranked_run, count, rating, age, failed in conn.execute(last_walk):
                state = states[pid]
                state.reviews_synced_run = synced
                state.ranked_at_sync = (count, rating) if ranked_run is not None else None
                state.days_since_sync = float(age) if age is not None else None
                state.failed_since_sync = bool(failed)
            known = sa.select(reviews.c.product_id, reviews.c.id,
                              reviews.c.first_seen_run <= products.c.reviews_synced_run).join(
                products, products.c.id == reviews.c.product_id).where(
                reviews.c.product_id.in_(ids))
            for pid, rid, at_sync in conn.execute(known):
                states[pid].known.add(rid)
                if at_sync:
                    states[pid].known_at_sync.add(rid)
            photos = sa.select(reviews.c.product_id, reviews.c.id, reviews.c.photo_url,
                               review_photos.c.sha256).select_from(
                reviews.outerjoin(review_photos, review_photos.c.review_id == reviews.c.id)).where(
                reviews.c.product_id.in_(ids), reviews.c.photo_url.is_not(None)).order_by(
                reviews.c.product_id, reviews.c.id.desc())
            rejected = sa.select(crawl_failures.c.product_id, crawl_failures.c.review_id).where(
                crawl_failures.c.product_id.in_(ids), crawl_failures.c.stage == "image",
                crawl_failures.c.reason.in_(sorted(CONTENT_REJECTIONS)),
                crawl_failures.c.run_id < self.run_id).distinct()
            for pid, rid in conn.execute(rejected):
                states[pid].photos_rejected.add(rid)
            for pid, rid, url, sha in conn.execute(photos):
                if sha is None and rid not in states[pid].photos_rejected:
                    states[pid].photos_missing.append((rid, url))
                else:
                    states[pid].reviews_with_photo_stored.add(rid)
            for pid, url in conn.execute(sa.select(
                    catalogue_images.c.product_id, catalogue_images.c.source_url).where(
                    catalogue_images.c.product_id.in_(ids))):
                states[pid].catalogue_url = url
            for pid, url in conn.execute(sa.select(
                    crawl_failures.c.product_id, crawl_failures.c.url).where(
                    crawl_failures.c.product_id.in_(ids),
                    crawl_failures.c.stage == "catalogue_image",
                    crawl_failures.c.reason.in_(sorted(CONTENT_REJECTIONS)),
                    crawl_failures.c.run_id < self.run_id).distinct()):
                states[pid].catalogue_refused.add(url)
        return states

    # --- reviews ----------------------------------------------------------------------------
    def record_reviews(self, product_id: int, page: list[site.Review], url: str) -> int:
        """Upsert one page of reviews; returns how many were new to the manifest."""
        if not page:
            return 0
        rows = [dict(id=r.id, product_id=product_id, created_date=r.created_date, stars=r.stars,
                     comment=r.comment, writer_nickname=r.writer_nickname, photo_url=r.photo_url,
                     source_url=url, first_seen_run=self.run_id) for r in page]
        with self.engine.begin() as conn:
            before = conn.execute(sa.select(sa.func.count()).select_from(reviews).where(
                reviews.c.id.in_([r.id for r in page]))).scalar_one()
            conn.execute(_UPSERT_REVIEWS, rows)
        return len(page) - before

    def mark_reviews_synced(self, product_id: int) -> None:
        """Only after a complete walk: the next run may stop paging at what is known now."""
        with self.engine.begin() as conn:
            conn.execute(products.update().where(products.c.id == product_id)
                         .values(reviews_synced_run=self.run_id))

    # --- photos -----------------------------------------------------------------------------
    def record_photos(self, photos: list[PhotoRow]) -> list[bool]:
        """Image rows (first review that brought the bytes) and each review's link, atomically.

        Call only after every photo's object is in the store. One transaction for the whole
        batch: a crash leaves either all of the batch's rows or none (objects without rows are
        adopted by the next run's download). Returns, per photo, whether it brought new bytes
        (its image row is new and no earlier photo of the batch had the same bytes).
        """
        if not photos:
            return []
        image_rows = {}
        for p in photos:  # a repeated photo in one batch: the first review keeps the image row
            image_rows.setdefault(p.sha256, dict(
                sha256=p.sha256, object_key=p.object_key, size_bytes=p.size_bytes,
                width=p.width, height=p.height, format=p.format, source_url=p.source_url,
                review_id=p.review_id, product_id=p.product_id, first_seen_run=self.run_id))
        # One link per review (ON CONFLICT DO UPDATE may not touch a row twice in one statement).
        links = {p.review_id: dict(review_id=p.review_id, sha256=p.sha256, run_id=self.run_id)
                 for p in photos}
        with self.engine.begin() as conn:
            new = set(conn.execute(_INSERT_NEW_IMAGES, list(image_rows.values())).scalars())
            conn.execute(_UPSERT_REVIEW_PHOTOS, list(links.values()))
        firsts = []
        for p in photos:
            firsts.append(p.sha256 in new)
            new.discard(p.sha256)
        return firsts

    # --- catalogue images -------------------------------------------------------------------
    def record_catalogue_image(self, image: CatalogueImageRow) -> None:
        """The product's catalogue image row: the latest one stored wins (upsert on the
        product). Call only after its object is in the store."""
        with self.engine.begin() as conn:
            conn.execute(_UPSERT_CATALOGUE_IMAGE, dict(
                product_id=image.product_id, sha256=image.sha256, object_key=image.object_key,
                source_url=image.source_url, size_bytes=image.size_bytes, width=image.width,
                height=image.height, format=image.format, run_id=self.run_id))

    # --- failures ---------------------------------------------------------------------------
    def record_failure(self, failure: FailureRecord) -> None:
        with self.engine.begin() as conn:
            conn.execute(crawl_failures.insert().values(
                run_id=self.run_id, category_id=failure.category_id,
                product_id=_bigint_or_none(failure.product_id),
                review_id=_bigint_or_none(failure.review_id), url=_storable(failure.url),
                stage=failure.stage, reason=failure.reason,
                detail=_storable(failure.detail or "")[:2000] or None))


def _storable(text: str) -> str:
    """Text PostgreSQL accepts: a failure's URL or detail may quote the hostile value itself."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _bigint_or_none(value) -> int | None:
    return value if isinstance(value, int) and -2 ** 63 <= value < 2 ** 63 else None


def _upsert(table, keys: list[str], refreshed: tuple[str, ...], also=None):
    """INSERT ... ON CONFLICT (keys) DO UPDATE: the ``refreshed`` columns take the new row's
    values; ``also(excluded)`` gives any other column's expression."""
    stmt = insert(table)
    return stmt.on_conflict_do_update(
        index_elements=[table.c[k] for k in keys],
        set_={**{c: stmt.excluded[c] for c in refreshed},
              **(also(stmt.excluded) if also else {})})


# The upserts, built once and run with a row or a list of rows (SQLAlchemy's
# "insertmanyvalues": one multi-row INSERT per batch), so their compiled form is cached. A
# statement holding the rows themselves (``.values(rows)``) is compiled again for every
# transaction: ~4 ms of CPU each, measured, when the batches are a few photos; built per call,
# the review pages' and rankings' upserts were ~8 % of the crawl process's GIL time (profiled).
_UPSERT_CATEGORY = _upsert(categories, ["id"], ("source_url", "last_seen_run"),
                           lambda new: {"name": sa.func.coalesce(new.name, categories.c.name)})
_UPSERT_PRODUCT = _upsert(products, ["id"], (
    "category_id", "name", "brand", "price", "rank", "review_count", "rating", "source_url",
    "last_seen_run"), lambda new: {"last_seen_at": sa.func.now()})
_UPSERT_PRODUCT_RANK = _upsert(product_ranks, ["run_id", "product_id"], (
    "category_id", "rank", "review_count", "rating", "source_url"))
_UPSERT_REVIEWS = _upsert(reviews, ["id"], (
    "product_id", "created_date", "stars", "comment", "writer_nickname", "photo_url"))
_INSERT_NEW_IMAGES = (insert(images).on_conflict_do_nothing(index_elements=[images.c.sha256])
                      .returning(images.c.sha256))
_UPSERT_CATALOGUE_IMAGE = _upsert(catalogue_images, ["product_id"], (
    "sha256", "object_key", "source_url", "size_bytes", "width", "height", "format", "run_id"),
    lambda new: {"stored_at": sa.func.now()})
_UPSERT_REVIEW_PHOTOS = _upsert(review_photos, ["review_id"], ("sha256",))


# --- runs -----------------------------------------------------------------------------------
def ensure_run(manifest_url: str, run_key: str, shop_base_url: str, settings_json: dict) -> int:
    """The run row for ``run_key`` (created once; a retried task gets the same id)."""
    engine = engine_for(manifest_url)
    with engine.begin() as conn:
        stmt = insert(crawl_runs).values(run_key=run_key, shop_base_url=shop_base_url,
                                         settings=settings_json)
        conn.execute(stmt.on_conflict_do_nothing(index_elements=[crawl_runs.c.run_key]))
        run_id, status = conn.execute(sa.select(crawl_runs.c.id, crawl_runs.c.status).where(
            crawl_runs.c.run_key == run_key)).one()
        if status != "running":  # a rerun of a finished run (e.g. Airflow clear) runs again
            conn.execute(crawl_runs.update().where(crawl_runs.c.id == run_id).values(
                status="running", finished_at=None))
    return run_id


def ensure_run_id(manifest_url: str, run_key: str) -> int:
    with engine_for(manifest_url).connect() as conn:
        run_id = conn.execute(sa.select(crawl_runs.c.id).where(
            crawl_runs.c.run_key == run_key)).scalar()
    if run_id is None:
        raise RunNotFound(f"no crawl run with run_key {run_key!r}; call start_run first")
    return run_id


def merge_category_stats(manifest_url: str, run_id: int, category_id: str, stats: dict) -> None:
    """``crawl_runs.stats.categories.<id>`` = the category's crawl stats (last attempt wins)."""
    with engine_for(manifest_url).begin() as conn:
        conn.execute(sa.text(
            "UPDATE crawl_runs SET stats = stats || jsonb_build_object('categories', "
            "coalesce(stats->'categories', '{}'::jsonb) || jsonb_build_object(:cat, "
            "CAST(:value AS jsonb))) WHERE id = :id"),
            {"cat": category_id, "value": json.dumps(stats), "id": run_id})


def finish_run_row(manifest_url: str, run_key: str, status: str, stats: dict) -> int:
    with engine_for(manifest_url).begin() as conn:
        run_id = conn.execute(sa.select(crawl_runs.c.id).where(
            crawl_runs.c.run_key == run_key)).scalar()
        if run_id is None:
            raise RunNotFound(f"no crawl run with run_key {run_key!r}")
        conn.execute(crawl_runs.update().where(crawl_runs.c.id == run_id).values(
            status=status, finished_at=dt.datetime.now(dt.timezone.utc),
            stats=crawl_runs.c.stats.op("||")(sa.cast(sa.literal(stats, sa.JSON),
                                                      JSONB))))
    return run_id

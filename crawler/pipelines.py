"""Item pipeline: validate a downloaded review photo or catalogue image, store it, then record it
in the manifest.

Both kinds take the same path: the one decoder's checks (:mod:`crawler.images`), a broken body
downloaded again via Scrapy's retry, the object under its content address (images/<sha256>),
and a refusal recorded as a ``crawl_failures`` row of the item's stage (``image`` for a review
photo, ``catalogue_image`` for a product's catalogue image). Only the rows differ: a review
photo's ``images`` + ``review_photos`` rows (group-committed), a catalogue image's
``catalogue_images`` row (one upsert per product: the latest image wins).

Order matters for crash safety: the object is written first (content-addressed, so writing the
same bytes again is a no-op and needs no existence check), then the image and review_photos
rows, in one transaction shared with the photos stored meanwhile (group commit). A crash in
between leaves objects without rows, which the next run's download of the same photos adopts;
never a row without an object.

Any other exception (a bug, or a photo the code did not foresee) is recorded as that photo's
``pipeline_exception`` failure and fails the category (crawler/run.py), like an exception in a
spider callback: Scrapy itself would only log it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import sqlalchemy as sa
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import DropItem, IgnoreRequest

from crawler.group_commit import GroupCommit
from crawler.images import IMAGE_CONTENT_TYPES, ImageRejected, ValidImage, validate_image
from crawler.items import CatalogueImageItem, ReviewPhotoItem
from crawler.manifest_writer import CatalogueImageRow, FailureRecord, ManifestWriter, PhotoRow
from shoplens.store import ObjectStore, image_key

logger = logging.getLogger(__name__)


_DATABASE_DOWN = (sa.exc.OperationalError, sa.exc.InterfaceError)


class StoreUnavailable(RuntimeError):
    """The object store did not accept a write (down, refusing, out of space)."""


class _SharedPhotoWork:
    """The photo threads and the group-committed photo rows of one run in this process, shared
    by the categories it crawls at once: one pool of ``SHOPLENS_PHOTO_THREADS`` threads (not
    one per category, which only adds threads contending for the GIL) and one transaction
    stream (bigger batches, fewer commits)."""

    def __init__(self, writer: ManifestWriter, threads: int, max_batch: int):
        # Decoding, hashing and the S3 PUT block: they run in these threads, off the event loop.
        self.workers = ThreadPoolExecutor(threads, thread_name_prefix="photo")
        self.photo_rows: GroupCommit[PhotoRow, bool] = GroupCommit(
            writer.record_photos, max_batch=max_batch,
            # A row the database refuses costs its own photo, not the photos batched with it;
            # an outage fails the batch at once (and aborts the crawl below).
            isolate=lambda exc: not isinstance(exc, _DATABASE_DOWN))
        self.users = 0


_SHARED_WORK: dict[tuple[str, int], _SharedPhotoWork] = {}


class ReviewPhotoPipeline:
    def __init__(self, crawler):
        self.crawler = crawler
        self.shop = crawler.settings["SHOPLENS_SETTINGS"]
        self.store = ObjectStore(self.shop)
        self.writer: ManifestWriter | None = None
        self.shared: _SharedPhotoWork | None = None

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def open_spider(self) -> None:
        self.writer = self.crawler.spider.writer
        key = (self.shop.manifest_url, self.writer.run_id)
        self.shared = _SHARED_WORK.get(key)
        if self.shared is None:
            settings = self.crawler.settings
            self.shared = _SHARED_WORK[key] = _SharedPhotoWork(
                self.writer, settings.getint("SHOPLENS_PHOTO_THREADS", 4),
                settings.getint("SHOPLENS_PHOTO_BATCH", 200))
        self.shared.users += 1
        self.workers, self.photo_rows = self.shared.workers, self.shared.photo_rows

    def close_spider(self) -> None:
        # The process's photo transactions so far (shared by the categories crawled at once).
        self.crawler.stats.set_value("shoplens/photo_transactions", self.photo_rows.transactions)
        self.shared.users -= 1
        if self.shared.users == 0:  # the last category of the process: every item is settled
            self.workers.shutdown(wait=False, cancel_futures=True)
            _SHARED_WORK.pop((self.shop.manifest_url, self.writer.run_id), None)

    async def process_item(self, item):
        if isinstance(item, ReviewPhotoItem):
            store = self._store_photo
        elif isinstance(item, CatalogueImageItem):
            store = self._store_catalogue_image
        else:
            return item
        spider = self.crawler.spider
        if spider.fatal_error:
            raise DropItem("crawl aborted")
        try:
            return await store(item)
        except (DropItem, IgnoreRequest):  # settled (recorded, retried or aborting)
            raise
        except Exception as exc:  # noqa: BLE001 - one photo must not pass unrecorded
            await spider._unexpected(item.request, exc, reason="pipeline_exception")
            raise DropItem(f"unexpected {type(exc).__name__}, recorded") from None

    async def _stored(self, item: ReviewPhotoItem | CatalogueImageItem, stage: str,
                      rejected_stat: str) -> tuple[ValidImage, str]:
        """The item's image facts and object key once its bytes are in the store; a refused
        body is downloaded again (Scrapy's retry), then recorded as a ``stage`` failure."""
        spider = self.crawler.spider
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.workers, self._validate_and_store, item)
        except ImageRejected as rejected:
            # A broken body may be a transient fault of the CDN: download it again first.
            retry = get_retry_request(item.request, spider=spider,
                                      reason=f"image_{rejected.reason}")
            if retry is not None:
                self.crawler.engine.crawl(retry)
                raise DropItem(f"{rejected}; downloading again") from None
            stats = self.crawler.stats
            stats.inc_value(f"shoplens/failures/{rejected.reason}")
            stats.inc_value(rejected_stat)
            await spider._db(self.writer.record_failure, FailureRecord(
                stage=stage, reason=rejected.reason, url=item.url, detail=rejected.detail,
                category_id=item.category_id, product_id=item.product_id,
                review_id=getattr(item, "review_id", None)))
            raise DropItem(str(rejected)) from None
        except StoreUnavailable as exc:
            spider.abort(str(exc))
            raise DropItem("object store unavailable") from None

    async def _store_photo(self, item: ReviewPhotoItem) -> dict:
        spider = self.crawler.spider
        stats = self.crawler.stats
        image, key = await self._stored(item, "image", "shoplens/photos_rejected")
        try:
            new_image = await self.photo_rows.submit(PhotoRow(
                sha256=image.sha256, object_key=key, size_bytes=image.size_bytes,
                width=image.width, height=image.height, format=image.format, source_url=item.url,
                review_id=item.review_id, product_id=item.product_id))
        except _DATABASE_DOWN as exc:
            spider.abort(f"manifest database unavailable: {str(exc.orig or exc).strip()[:300]}")
            raise DropItem("manifest unavailable") from None
        stats.inc_value("shoplens/photos_stored")
        stats.set_value("shoplens/last_photo_stored_at", time.time())
        stats.inc_value("shoplens/bytes_stored", image.size_bytes)
        if new_image:
            stats.inc_value("shoplens/images_new")
        return {"review_id": item.review_id, "sha256": image.sha256}

    async def _store_catalogue_image(self, item: CatalogueImageItem) -> dict:
        image, key = await self._stored(item, "catalogue_image",
                                        "shoplens/catalogue_images_rejected")
        # An unreachable database aborts the crawl there (and drops the item).
        await self.crawler.spider._db(self.writer.record_catalogue_image, CatalogueImageRow(
            product_id=item.product_id, sha256=image.sha256, object_key=key,
            source_url=item.source_url, size_bytes=image.size_bytes, width=image.width,
            height=image.height, format=image.format))
        self.crawler.stats.inc_value("shoplens/catalogue_images_stored")
        return {"product_id": item.product_id, "sha256": image.sha256}

    def _validate_and_store(self, item: ReviewPhotoItem | CatalogueImageItem
                            ) -> tuple[ValidImage, str]:
        """Decode-checked image facts and the key its bytes are stored under."""
        image = validate_image(item.body, item.content_type,
                               max_pixels=self.shop.max_image_pixels,
                               max_bytes=self.shop.max_image_bytes)
        if self.crawler.spider.fatal_error:  # queued behind the write that found the outage
            raise StoreUnavailable(self.crawler.spider.fatal_error)
        key = image_key(image.sha256, image.format)
        try:
            self.store.write_object(key, item.body, IMAGE_CONTENT_TYPES[image.format],
                                    sha256=image.sha256)
        except Exception as exc:  # S3 error statuses, connection errors of several kinds
            raise StoreUnavailable(f"object store {self.shop.s3_endpoint} bucket "
                                   f"{self.shop.s3_bucket!r} refused a write: "
                                   f"{type(exc).__name__}: {str(exc)[:300]}") from exc
        return image, key

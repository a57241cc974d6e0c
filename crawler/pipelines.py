"""Item pipeline: validate a downloaded review photo, store it, then record it in the manifest.

Order matters for crash safety: the object is written first (content-addressed, so writing the
same bytes again is a no-op and needs no existence check), then the image and review_photos
rows, in one transaction shared with the photos stored meanwhile (group commit). A crash in
between leaves objects without rows, which the next run's download of the same photos adopts;
never a row without an object.
"""
from __future__ import annotations

import logging
import time

import sqlalchemy as sa
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import DropItem

from crawler.group_commit import GroupCommit
from crawler.images import ImageRejected
from crawler.items import ReviewPhotoItem
from crawler.manifest_writer import FailureRecord, ManifestWriter, PhotoRow
from crawler.photo_workers import BrokenProcessPool, PhotoWorkers, StoreUnavailable

logger = logging.getLogger(__name__)


class ReviewPhotoPipeline:
    def __init__(self, crawler):
        self.crawler = crawler
        self.shop = crawler.settings["SHOPLENS_SETTINGS"]
        self.writer: ManifestWriter | None = None
        # Decoding, hashing and the S3 PUT: in worker processes, off the event loop and its GIL.
        self.workers = PhotoWorkers(self.shop,
                                    crawler.settings.getint("SHOPLENS_PHOTO_PROCESSES", 4))
        self.photo_rows: GroupCommit[PhotoRow, bool] = GroupCommit(
            lambda rows: self.writer.record_photos(rows),
            max_batch=crawler.settings.getint("SHOPLENS_PHOTO_BATCH", 200))

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def open_spider(self) -> None:
        self.writer = self.crawler.spider.writer
        self.workers.start()

    def close_spider(self) -> None:
        self.workers.shutdown()  # every item is settled by now
        self.crawler.stats.set_value("shoplens/photo_transactions", self.photo_rows.transactions)

    async def process_item(self, item):
        if not isinstance(item, ReviewPhotoItem):
            return item
        spider = self.crawler.spider
        if spider.fatal_error:
            raise DropItem("crawl aborted")
        stats = self.crawler.stats
        try:
            image, key = await self.workers.validate_and_store(item.body, item.content_type)
            new_image = await self.photo_rows.submit(PhotoRow(
                sha256=image.sha256, object_key=key, size_bytes=image.size_bytes,
                width=image.width, height=image.height, format=image.format, source_url=item.url,
                review_id=item.review_id, product_id=item.product_id))
        except ImageRejected as rejected:
            # A broken body may be a transient fault of the CDN: download it again first.
            retry = get_retry_request(item.request, spider=spider,
                                      reason=f"image_{rejected.reason}")
            if retry is not None:
                self.crawler.engine.crawl(retry)
                raise DropItem(f"{rejected}; downloading again") from None
            stats.inc_value(f"shoplens/failures/{rejected.reason}")
            stats.inc_value("shoplens/photos_rejected")
            await spider._db(self.writer.record_failure, FailureRecord(
                stage="image", reason=rejected.reason, url=item.url, detail=rejected.detail,
                category_id=item.category_id, product_id=item.product_id,
                review_id=item.review_id))
            raise DropItem(str(rejected)) from None
        except StoreUnavailable as exc:
            spider.abort(str(exc))
            raise DropItem("object store unavailable") from None
        except BrokenProcessPool as exc:  # a worker died (killed, or crashed in a decoder)
            spider.abort(f"a photo worker process died: {exc}")
            raise DropItem("photo workers unavailable") from None
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            spider.abort(f"manifest database unavailable: {str(exc.orig or exc).strip()[:300]}")
            raise DropItem("manifest unavailable") from None
        stats.inc_value("shoplens/photos_stored")
        stats.set_value("shoplens/last_photo_stored_at", time.time())
        stats.inc_value("shoplens/bytes_stored", image.size_bytes)
        if new_image:
            stats.inc_value("shoplens/images_new")
        return {"review_id": item.review_id, "sha256": image.sha256}

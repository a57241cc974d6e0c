"""One category: best-N ranking -> product pages -> every review page -> each photo once, and
each product's catalogue image (``originalImageUrl``).

Incremental: a product whose review count and rating in the ranking are those of its last
complete walk is not walked at all (no product page, no review page) unless that walk is older
than ``Settings.recheck_unchanged_days`` or a failure was recorded for it since. A product's review
walk (newest first) stops at the first page that reaches reviews known at the product's last
complete walk (``products.reviews_synced_run``) once the shop's review count is accounted for,
and a review whose photo is already in the manifest is never downloaded again. Photos of known
reviews that are still missing (an earlier failure) are requested again, so failures heal on the
next run.

The catalogue image of every ranked product is asked for once a night from the first answer that
gives it (the ranking, else the product page), unless the manifest already holds that very
address for the product (``catalogue_images.source_url``) or an earlier night refused its bytes:
an unchanged image is not downloaded again, a new address replaces the stored image.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from typing import Any, Callable

import scrapy
import sqlalchemy as sa
from scrapy import Request, signals
from scrapy.downloadermiddlewares.retry import get_retry_request
from scrapy.exceptions import IgnoreRequest
from scrapy.http import Response
from twisted.python.failure import Failure

from crawler import failures as failure_codes
from crawler.items import CatalogueImageItem, ReviewPhotoItem
from crawler.middlewares import OffsiteRequest
from crawler.manifest_writer import FailureRecord, ManifestWriter, ProductState
from crawler.site import ParseError, ShopSite

logger = logging.getLogger(__name__)


class ReviewsSpider(scrapy.Spider):
    name = "reviews"

    def __init__(self, category_id: str, run_key: str, **kwargs: Any):
        super().__init__(**kwargs)
        self.category_id = str(category_id)
        self.run_key = run_key
        self.fatal_error: str | None = None
        self.states: dict[int, ProductState] = {}
        self.ranks: dict[int, int] = {}
        self.photos_scheduled: dict[int, int] = defaultdict(int)
        self.reviews_scheduled: set[int] = set()
        self.unknown_seen: dict[int, set[int]] = defaultdict(set)  # per product, this walk
        self.catalogue_handled: set[int] = set()  # products whose catalogue image was dealt with
        self._closing: asyncio.Task | None = None

    @classmethod
    def from_crawler(cls, crawler, *args: Any, **kwargs: Any):
        spider = super().from_crawler(crawler, *args, **kwargs)
        spider.shop = crawler.settings["SHOPLENS_SETTINGS"]
        spider.site = ShopSite(spider.shop.shop_base_url, spider.shop.image_params)
        spider.writer = ManifestWriter.for_run_key(spider.shop.manifest_url, spider.run_key)
        # Every request that reaches the downloader (retries and redirects included).
        crawler.signals.connect(spider._count_request, signal=signals.request_reached_downloader)
        return spider

    def _count_request(self, request: Request) -> None:
        self.crawler.stats.inc_value("shoplens/requests")

    # --- flow -------------------------------------------------------------------------------
    async def start(self):
        url = self.site.ranks_page_url(self.category_id)
        yield Request(url, callback=self.parse_ranks_page, errback=self.on_error,
                      meta=self._meta("ranking"))

    async def parse_ranks_page(self, response: Response):
        try:
            build_id = self.site.parse_build_id(response.text)
        except ParseError as exc:
            for out in await self._parse_failed(response, exc):
                yield out
            return
        yield Request(self.site.ranks_data_url(build_id, self.category_id),
                      headers=self.site.guarded_headers(response.url), callback=self.parse_ranking,
                      errback=self.on_error, meta=self._meta("ranking"))

    async def parse_ranking(self, response: Response):
        try:
            ranking = self.site.parse_ranking(response.body, response.url)
        except ParseError as exc:
            for out in await self._parse_failed(response, exc):
                yield out
            return
        for entry in ranking.rejected:  # one bad product entry costs that product only
            await self._record(response.request, entry.reason,
                               f"product #{entry.position}: {entry.detail}",
                               product_id=entry.entry_id)
        best = ranking.products[: self.shop.best_n]
        name = ranking.category.name if ranking.category else None
        ranks_page = self.site.ranks_page_url(self.category_id)
        await self._db(self.writer.record_ranking, self.category_id, name, ranks_page, best,
                       self.site.product_page_url)
        self.states = await self._db(self.writer.product_states, [p.id for p in best])
        self.crawler.stats.set_value("shoplens/products", len(best))
        for product in best:
            self.ranks[product.id] = product.rank
            request = await self._catalogue_image_request(
                response.request, product.id, product.image_url, product.image_error)
            if request is not None:
                yield request
            # Photos an earlier run could not store: asked for again straight from the manifest.
            for review_id, photo_url in self.states[product.id].photos_missing:
                request = await self._photo_request(product.id, review_id, photo_url)
                if request is not None:
                    self.crawler.stats.inc_value("shoplens/photos_healing")
                    yield request
            if self.states[product.id].unchanged_since_sync(
                    product.review_count, product.rating, self.shop.recheck_unchanged_days):
                self.crawler.stats.inc_value("shoplens/products_unchanged")
                continue
            yield Request(self.site.product_page_url(product.id), callback=self.parse_product,
                          errback=self.on_error, meta=self._meta("product", product.id))

    async def parse_product(self, response: Response):
        product_id = response.meta["product_id"]
        try:
            page = self.site.parse_product_page(response.text, response.url)
        except ParseError as exc:
            for out in await self._parse_failed(response, exc):
                yield out
            return
        if page.id != product_id:  # never let one product's page overwrite another product
            await self._record(response.request, "product_id_mismatch",
                               f"the page of product {product_id} describes product {page.id}")
            return
        await self._db(self.writer.record_product_page, self.category_id,
                       self.ranks.get(product_id), page, response.url)
        request = await self._catalogue_image_request(response.request, product_id,
                                                      page.image_url, page.image_error)
        if request is not None:
            yield request
        yield self._reviews_request(product_id, 1, referer=response.url)

    async def parse_reviews(self, response: Response):
        product_id, page_no = response.meta["product_id"], response.meta["page"]
        try:
            page = self.site.parse_reviews(response.body, response.url)
        except ParseError as exc:
            for out in await self._parse_failed(response, exc):
                yield out
            return
        for entry in page.rejected:  # the page's other reviews are still good
            await self._record(response.request, entry.reason,
                               f"review #{entry.position}: {entry.detail}",
                               review_id=entry.entry_id)
        stats = self.crawler.stats
        stats.inc_value("shoplens/review_pages")
        stats.inc_value("shoplens/reviews_seen", len(page.reviews))
        new = await self._db(self.writer.record_reviews, product_id, page.reviews, response.url)
        stats.inc_value("shoplens/reviews_new", new)
        state = self.states[product_id]
        for review in page.reviews:
            if review.photo_error is not None:
                await self._record(response.request, review.photo_error.reason,
                                   review.photo_error.detail, stage="image",
                                   review_id=review.id)
            elif (review.photo_url and review.id not in state.reviews_with_photo_stored
                    and review.id not in state.photos_rejected):
                request = await self._photo_request(product_id, review.id, review.photo_url)
                if request is not None:
                    yield request
        unseen = self.unknown_seen[product_id]
        unseen.update(r.id for r in page.reviews if r.id not in state.known)
        per = self.shop.reviews_per_page
        at_end = (not page.entries
                  or (page.total_count is not None and page_no * per >= page.total_count))
        # Known territory: a review known at the last complete walk, and (when the shop says
        # how many it has) every review accounted for. The count matters because a new review
        # is not always the newest one (e.g. a delayed moderation publishes an older review).
        reached_known = any(r.id in state.known_at_sync for r in page.reviews) and (
            page.total_count is None or len(state.known) + len(unseen) >= page.total_count)
        if reached_known or at_end:
            await self._db(self.writer.mark_reviews_synced, product_id)
            stats.inc_value("shoplens/products_synced")
        else:
            yield self._reviews_request(product_id, page_no + 1,
                                        referer=response.request.headers.get("Referer", b"").decode())

    async def parse_photo(self, response: Response):
        meta = response.meta
        yield ReviewPhotoItem(
            body=response.body, content_type=(response.headers.get("Content-Type") or b"").decode(
                "latin-1") or None, url=response.url, review_id=meta["review_id"],
            product_id=meta["product_id"], category_id=self.category_id, request=response.request)

    async def parse_catalogue_image(self, response: Response):
        meta = response.meta
        yield CatalogueImageItem(
            body=response.body, content_type=(response.headers.get("Content-Type") or b"").decode(
                "latin-1") or None, url=response.url, source_url=meta["catalogue_url"],
            product_id=meta["product_id"], category_id=self.category_id, request=response.request)

    # --- requests ---------------------------------------------------------------------------
    def _meta(self, stage: str, product_id: int | None = None, **extra: Any) -> dict:
        return {"stage": stage, "product_id": product_id, **extra}

    def _reviews_request(self, product_id: int, page: int, referer: str) -> Request:
        return Request(self.site.reviews_url(product_id, page, self.shop.reviews_per_page),
                       headers=self.site.guarded_headers(referer), callback=self.parse_reviews,
                       errback=self.on_error, meta=self._meta("reviews", product_id, page=page))

    async def _catalogue_image_request(self, listed_by: Request, product_id: int,
                                       address: str | None,
                                       error: ParseError | None) -> Request | None:
        """The product's catalogue image at the fixed size, from the first answer of the night
        that gives one (address or error); None when it is already stored under this address,
        its bytes were refused before, or its address is unusable (recorded)."""
        if product_id in self.catalogue_handled or (address is None and error is None):
            return None
        self.catalogue_handled.add(product_id)
        stats = self.crawler.stats
        if error is not None:
            await self._record(listed_by, error.reason, error.detail, stage="catalogue_image",
                               product_id=product_id)
            return None
        state = self.states[product_id]
        if state.catalogue_url == address:
            stats.inc_value("shoplens/catalogue_images_unchanged")
            return None
        try:
            url = self.site.image_url(address)
        except ParseError as exc:  # the address was checked when parsed: never expected
            await self._record(listed_by, exc.reason, exc.detail, stage="catalogue_image",
                               product_id=product_id, url=address[:2000])
            return None
        if url in state.catalogue_refused:
            stats.inc_value("shoplens/catalogue_images_unchanged")
            return None
        stats.inc_value("shoplens/catalogue_images_requested")
        return Request(url, callback=self.parse_catalogue_image, errback=self.on_error,
                       dont_filter=True, meta=self._meta(
                           "catalogue_image", product_id, catalogue_url=address,
                           download_maxsize=self.shop.max_image_bytes))

    async def _photo_request(self, product_id: int, review_id: int,
                             photo_url: str) -> Request | None:
        """The photo at the fixed size, unless already asked for or the product's cap is met.

        The address may come from the manifest, stored by an older night: a bad one is recorded
        as the review's failure (each night), never raised.
        """
        if review_id in self.reviews_scheduled:
            return None
        meta = self._meta("image", product_id, review_id=review_id,
                          download_maxsize=self.shop.max_image_bytes)
        try:
            request = Request(self.site.image_url(photo_url), callback=self.parse_photo,
                              errback=self.on_error, dont_filter=True, meta=meta)
        except (ParseError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, ParseError) else "bad_photo_url"
            await self._record(None, reason, str(exc)[:300], stage="image",
                               product_id=product_id, review_id=review_id,
                               url=str(photo_url)[:2000])
            return None
        state = self.states[product_id]
        if (len(state.reviews_with_photo_stored) + self.photos_scheduled[product_id]
                >= self.shop.photo_cap_per_product):
            self.crawler.stats.inc_value("shoplens/photos_over_cap")
            return None
        self.reviews_scheduled.add(review_id)
        self.photos_scheduled[product_id] += 1
        stats = self.crawler.stats
        stats.inc_value("shoplens/photos_requested")
        if stats.get_value("shoplens/first_photo_request_at") is None:
            stats.set_value("shoplens/first_photo_request_at", time.time())
        # Each review's photo is asked for once (reviews_scheduled, and the manifest across
        # runs): Scrapy's URL fingerprinting (CPU per request) would only drop the photo of a
        # second review that shows the very same file.
        return request

    # --- failures ---------------------------------------------------------------------------
    async def _parse_failed(self, response: Response, exc: ParseError) -> list:
        """A malformed answer may be a transient error page: retry, then record it."""
        retry = get_retry_request(response.request, spider=self, reason=exc.reason)
        if retry is not None:
            return [retry]
        await self._record(response.request, exc.reason, exc.detail)
        return []

    async def on_error(self, failure: Failure):
        try:
            async for out in self._on_error(failure):
                yield out
        except IgnoreRequest:
            return  # the crawl is aborting
        except Exception as exc:  # noqa: BLE001 - an errback must not stop the category
            await self._unexpected(failure.request, exc)

    async def _unexpected(self, request: Request, exc: BaseException,
                          reason: str = "spider_exception") -> None:
        """A bug or an unforeseen answer: recorded with ``reason`` (``spider_exception`` from
        a callback, ``pipeline_exception`` from the item pipeline), counted in
        ``shoplens/<reason>s`` (the crawl then ends in error) and the crawl goes on with the
        next request."""
        self.crawler.stats.inc_value(f"shoplens/{reason}s")
        logger.error("unexpected %s at %s", type(exc).__name__, request.url,
                     exc_info=(type(exc), exc, exc.__traceback__))
        try:
            await self._record(request, reason, f"{type(exc).__name__}: {exc}")
        except Exception as record_exc:  # noqa: BLE001 - e.g. the very value the DB refused
            logger.error("could not record the failure either: %s", record_exc)

    async def _on_error(self, failure: Failure):
        request = failure.request
        exc = failure.value
        if isinstance(exc, OffsiteRequest) and exc.redirected_from:
            # The redirect may be a passing fault of the CDN: ask the allowed address again.
            original = request.replace(url=exc.redirected_from[0])
            for key in ("redirect_urls", "redirect_times", "redirect_ttl", "redirect_reasons"):
                original.meta.pop(key, None)
            retry = get_retry_request(original, spider=self, reason="offsite_redirect")
            if retry is not None:
                yield retry
                return
        reason, detail = failure_codes.classify(exc, request.meta.get("stage"))
        await self._record(request, reason, detail)

    async def _record(self, request: Request | None, reason: str, detail: str | None, *,
                      stage: str | None = None, product_id: int | None = None,
                      review_id: int | None = None, url: str | None = None) -> None:
        """One ``crawl_failures`` row; the keywords override what the request's meta says."""
        meta = request.meta if request is not None else {}
        stage = stage or meta.get("stage") or "unknown"
        url = url or (request.url if request is not None else "")
        self.crawler.stats.inc_value(f"shoplens/failures/{reason}")
        logger.warning("failure %s at %s (%s): %s", reason, url, stage, detail)
        await self._db(self.writer.record_failure, FailureRecord(
            stage=stage, reason=reason, url=url, detail=detail,
            category_id=self.category_id, product_id=product_id or meta.get("product_id"),
            review_id=review_id or meta.get("review_id")))

    # --- infrastructure ---------------------------------------------------------------------
    async def _db(self, fn: Callable, *args: Any) -> Any:
        """Run a blocking manifest call off the reactor; an unreachable database ends the crawl."""
        try:
            return await asyncio.to_thread(fn, *args)
        except (sa.exc.OperationalError, sa.exc.InterfaceError) as exc:
            self.abort(f"manifest database unavailable: {str(exc.orig or exc).strip()[:300]}")
            raise IgnoreRequest("crawl aborted") from exc

    def abort(self, message: str) -> None:
        """Stop the whole crawl (an outage of the store or the manifest): nothing half-written."""
        if self.fatal_error is None:
            self.fatal_error = message
            logger.error("aborting the crawl: %s", message)
            self._closing = asyncio.ensure_future(
                self.crawler.engine.close_spider_async(reason="aborted"))


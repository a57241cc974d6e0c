"""Scrapy middlewares: the scheme and host allow-list, the WAF cookie, Retry-After on HTTP 429
(downloader), and the guard that turns an exception in a spider callback into a recorded failure
(spider)."""
from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

from scrapy import Request
from scrapy.downloadermiddlewares.retry import RetryMiddleware
from scrapy.downloadermiddlewares.robotstxt import RobotsTxtMiddleware
from scrapy.exceptions import IgnoreRequest
from scrapy.http import Response
from scrapy.spidermiddlewares.httperror import HttpError
from scrapy.utils.httpobj import urlparse_cached

from crawler.browser import BrowserError, acquire_cookies, url_allowed
from crawler.site import ShopSite

logger = logging.getLogger(__name__)


class OffsiteRequest(IgnoreRequest):
    """A request (or a redirect target) outside the allow-list; it is never sent."""

    def __init__(self, url: str, redirected_from: list[str]):
        self.url = url
        self.redirected_from = redirected_from
        origin = f" (redirected from {redirected_from[0]})" if redirected_from else ""
        super().__init__(f"{url[:300]}: scheme or host not in the allow-list{origin}")


class WafChallenged(IgnoreRequest):
    """The WAF still answers a guarded call with its challenge page after the cookie was
    renewed for it: recorded as ``waf_challenge``, never parsed as the shop's answer."""

    def __init__(self, url: str, renewals: int):
        super().__init__(f"{url[:300]}: still the WAF's challenge page after {renewals} "
                         "cookie renewal(s)")


class HostAllowListMiddleware:
    """Drops every request whose scheme is not the shop's (``file:``, ``ftp:``, ``s3:``,
    ``data:`` ... never pass, whatever their host) or whose host is not the shop's or in
    ``allowed_hosts``.

    Placed before RobotsTxtMiddleware, and RedirectMiddleware sends redirect targets back through
    the whole chain, so an off-list host never sees even a robots.txt request.
    """

    def __init__(self, crawler):
        shop = crawler.settings["SHOPLENS_SETTINGS"]
        site = ShopSite(shop.shop_base_url)
        self.schemes = {site.scheme}
        self.allowed = {site.netloc, *shop.allowed_hosts}
        self.stats = crawler.stats

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def process_request(self, request: Request):
        if url_allowed(request.url, self.schemes, self.allowed):
            return None
        self.stats.inc_value("shoplens/offsite_dropped")
        raise OffsiteRequest(request.url, list(request.meta.get("redirect_urls", [])))


class HostSlotMiddleware:
    """Puts each request in the download slot of its host:port (Scrapy's default is the host
    name alone), so that concurrency, delay and AutoThrottle apply per server."""

    def process_request(self, request: Request):
        if "download_slot" not in request.meta:
            request.meta["download_slot"] = urlparse_cached(request).netloc
        return None


class SharedHostGate:
    """Keeps the per-host politeness of a crawl process whose categories crawl at once: every
    crawler (category) of the process has its own Scrapy downloader, so without this each would
    send ``concurrent_per_host`` requests to the shop; through this gate all of them together
    keep at most ``concurrent_per_host`` in flight per host:port and start them no closer than
    ``download_delay`` apart.

    Innermost downloader middleware: it holds a host's place from just before the request goes
    to the downloader until its response or exception comes back (retries and redirects queue
    again). Enabled by crawler/run.py when a process crawls more than one category.
    """

    def __init__(self, crawler):
        shop = crawler.settings["SHOPLENS_SETTINGS"]
        self.limit, self.delay = shop.concurrent_per_host, shop.download_delay
        self.held: set[Request] = set()
        from scrapy import signals

        crawler.signals.connect(self._release_all, signal=signals.spider_closed)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    def _host(self, request: Request) -> "_HostGate":
        netloc = request.meta.get("download_slot") or urlparse_cached(request).netloc
        gate = _HOST_GATES.get(netloc)
        if gate is None:
            gate = _HOST_GATES[netloc] = _HostGate(self.limit)
        return gate

    async def process_request(self, request: Request):
        gate = self._host(request)
        await gate.slots.acquire()
        if self.delay > 0:
            now = time.monotonic()
            start_at = max(now, gate.next_start)
            gate.next_start = start_at + self.delay
            if start_at > now:
                await asyncio.sleep(start_at - now)
        request.meta["shoplens_gate"] = gate
        self.held.add(request)
        return None

    def _release(self, request: Request) -> None:
        gate = request.meta.pop("shoplens_gate", None)
        if gate is not None and request in self.held:
            self.held.discard(request)
            gate.slots.release()

    def process_response(self, request: Request, response: Response):
        self._release(request)
        return response

    def process_exception(self, request: Request, exception: BaseException):
        self._release(request)
        return None

    def _release_all(self, spider=None) -> None:
        for request in list(self.held):
            self._release(request)


class SharedRobotsTxtMiddleware(RobotsTxtMiddleware):
    """Scrapy's robots.txt middleware, with one robots.txt per host for every category crawled
    in this process (not one request per category and host). Enabled with SharedHostGate."""

    def __init__(self, crawler):
        super().__init__(crawler)
        self._parsers = _ROBOT_PARSERS


_ROBOT_PARSERS: dict = {}


class _HostGate:
    def __init__(self, limit: int):
        self.slots = asyncio.Semaphore(limit)
        self.next_start = 0.0


_HOST_GATES: dict[str, _HostGate] = {}


class WafCookieMiddleware:
    """Adds the browser-obtained WAF cookie to guarded shop calls, once the shop asks for one.

    A guarded call goes out with the cookie held, or with none: the cookie is fetched only when
    the shop refuses a call (403/401, or the WAF's challenge page in place of the JSON, even
    with status 200: ``ShopSite.is_waf_challenge``), with the page the call names as its
    Referer (the page a visitor would be on), so a night when the WAF is off or its script
    changed crawls without one. A refusal of a request sent with the current cookie renews it;
    requests sent with an older cookie just retry with the newer one. The cookie is kept in a
    private temp file per shop, so the next crawl process reuses it instead of starting a browser
    again, as a visitor's browser would; the categories crawled in one process share it. A challenge page still served after
    ``max_renewals`` retries with a renewed cookie becomes :class:`WafChallenged`
    (``waf_challenge``); a refusal status stays the response (``http_403``).

    Placed after HttpCompressionMiddleware (590) on the way back, so it reads decoded bodies.
    """

    max_renewals = 2

    def __init__(self, crawler):
        self.shop = crawler.settings["SHOPLENS_SETTINGS"]
        self.site = ShopSite(self.shop.shop_base_url)
        self.allowed = {self.site.netloc, *self.shop.allowed_hosts}
        self.stats = crawler.stats
        key = hashlib.sha256(f"{self.site.base_url}|{self.shop.user_agent}".encode()).hexdigest()
        cache_file = Path(tempfile.gettempdir()) / f"shoplens-waf-{key[:20]}.json"
        # The categories crawled in one process share one cookie (and one browser start).
        self.jar = _WAF_JARS.get(cache_file)
        if self.jar is None:
            self.jar = _WAF_JARS[cache_file] = _WafJar(cache_file)
        if self.jar.cookie_header is not None:
            self.stats.inc_value("shoplens/waf_cookie_reused")

    # The shared jar's state, under the names this middleware always used.
    cookie_header = property(lambda self: self.jar.cookie_header)
    generation = property(lambda self: self.jar.generation)
    cache_file = property(lambda self: self.jar.cache_file)

    @classmethod
    def from_crawler(cls, crawler):
        return cls(crawler)

    async def _renew(self, page_url: str, seen_generation: int) -> None:
        jar = self.jar
        async with jar.lock:
            if jar.generation != seen_generation:
                return  # someone renewed it while we waited
            if jar.failed is not None and jar.failed[0] == seen_generation:
                raise jar.failed[1]
            started = time.monotonic()
            try:
                cookies = await acquire_cookies(
                    page_url, chromium_path=self.shop.chromium_path,
                    user_agent=self.shop.user_agent, allowed_hosts=self.allowed,
                    allowed_schemes={self.site.scheme}, timeout_s=self.shop.download_timeout)
            except BrowserError as exc:
                jar.failed = (seen_generation, exc)
                raise
            jar.cookie_header = "; ".join(f"{k}={v}" for k, v in cookies.items())
            jar.generation += 1
            jar.save()
            self.stats.inc_value("shoplens/waf_cookie_acquired")
            logger.info("WAF cookie obtained from %s in %.1fs", page_url,
                        time.monotonic() - started)

    def _page_for(self, request: Request) -> str:
        referer = request.headers.get("Referer")
        return referer.decode() if referer else self.site.base_url + "/"

    async def process_request(self, request: Request):
        if not self.site.is_waf_guarded(request.url):
            return None
        if self.cookie_header is not None:
            request.headers["Cookie"] = self.cookie_header
        request.meta["waf_generation"] = self.generation
        return None

    async def process_response(self, request: Request, response: Response):
        content_type = (response.headers.get("Content-Type") or b"").decode("latin-1")
        if not self.site.is_waf_challenge(request.url, response.status, content_type,
                                          response.body):
            return response
        renewals = request.meta.get("waf_renewals", 0)
        if renewals >= self.max_renewals:
            if response.status >= 400:
                return response  # an HTTP error: the errback records http_<status>
            self.stats.inc_value("shoplens/waf_challenged")
            raise WafChallenged(request.url, renewals)
        # A BrowserError propagates: the request's errback records it as ``waf_cookie``.
        await self._renew(self._page_for(request), request.meta.get("waf_generation", -1))
        retry = request.replace(dont_filter=True)
        retry.meta["waf_renewals"] = renewals + 1
        return retry


class _WafJar:
    """The WAF cookie of one shop in this process, shared by its category crawls, and kept in a
    private temp file so the next crawl process reuses it instead of starting a browser."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self.cookie_header: str | None = None
        self.generation = 0
        # A renewal that failed for a generation is not tried again by every refused request.
        self.failed: tuple[int, BrowserError] | None = None
        self.lock = asyncio.Lock()
        try:
            cached = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            return
        if isinstance(cached, dict) and isinstance(cached.get("cookie"), str):
            self.cookie_header = cached["cookie"]
            self.generation = 1

    def save(self) -> None:
        tmp = self.cache_file.with_name(f"{self.cache_file.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump({"cookie": self.cookie_header, "saved_at": time.time()}, fh)
            tmp.replace(self.cache_file)
        except OSError as exc:  # only an optimisation: the next process renews instead
            logger.info("could not cache the WAF cookie: %s", exc)


_WAF_JARS: dict[Path, _WafJar] = {}


class RetryAfterMiddleware(RetryMiddleware):
    """Scrapy's RetryMiddleware, but a retried 429 first waits what ``Retry-After`` asks
    (capped by ``retry_after_cap``); the other codes and exceptions retry as usual."""

    def __init__(self, settings):
        super().__init__(settings)
        self.cap = settings.getfloat("RETRY_AFTER_CAP", 60.0)

    async def process_response(self, request: Request, response: Response):
        if request.meta.get("dont_retry", False) or response.status not in self.retry_http_codes:
            return response
        retry = self._retry(request, f"http_{response.status}")
        if retry is None:
            return response
        if response.status == 429:
            wait = min(self.cap, retry_after_seconds(response.headers.get("Retry-After")))
            if wait > 0:
                self.crawler.stats.inc_value("shoplens/retry_after_waits")
                await asyncio.sleep(wait)
        return retry


def retry_after_seconds(value: bytes | None) -> float:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; 0 when absent or unreadable."""
    if not value:
        return 0.0
    text = value.decode("latin-1").strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return 0.0
    return max(0.0, when.timestamp() - time.time())


class CallbackGuardMiddleware:
    """Spider middleware: an exception escaping a callback (a bug, or an answer the site
    adapter did not foresee) becomes a ``spider_exception`` failure row, counted in
    ``shoplens/spider_exceptions`` (the crawl then ends in error, crawler/run.py), and the
    crawl goes on with the requests already scheduled instead of losing the category silently.
    """

    @classmethod
    def from_crawler(cls, crawler):
        middleware = cls()
        middleware.crawler = crawler
        return middleware

    def process_spider_exception(self, response: Response, exception: Exception):
        # HttpError goes to the errback; IgnoreRequest is the spider's own abort.
        if isinstance(exception, (HttpError, IgnoreRequest)):
            return None
        spider = self.crawler.spider

        async def recorded():
            await spider._unexpected(response.request, exception)
            return
            yield  # an async generator with no output: the exception is handled

        return recorded()

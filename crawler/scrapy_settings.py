"""Scrapy settings for the crawl, derived from shoplens ``Settings`` (politeness lives here)."""
from __future__ import annotations

from shoplens.config import Settings


# Scrapy's own handlers; "twisted" is Scrapy's default, so it needs no entry.
_DOWNLOAD_HANDLERS = {
    "twisted": {},
    "aiohttp": {scheme: "scrapy.core.downloader.handlers._aiohttp.AiohttpDownloadHandler"
                for scheme in ("http", "https")},
}
# Every other scheme Scrapy can fetch is switched off (the file handler would read a whole local
# file): the crawler talks http(s) to allow-listed hosts and nothing else.
DISABLED_SCHEMES = ("file", "s3", "ftp", "data")


def scrapy_settings(settings: Settings, crawls_in_process: int = 1) -> dict:
    """``crawls_in_process``: category crawls that run at once in this process; with more than
    one, ``SharedHostGate`` makes them share ``concurrent_per_host`` and ``download_delay``."""
    per_host = settings.concurrent_per_host
    config = {
        "SHOPLENS_SETTINGS": settings,
        "BOT_NAME": "shoplens",
        "USER_AGENT": settings.user_agent,
        "ROBOTSTXT_OBEY": settings.obey_robots,
        "DOWNLOAD_DELAY": settings.download_delay,
        "DOWNLOAD_DELAY_JITTER": 0.5,  # +-50% around DOWNLOAD_DELAY
        # One download slot per host:port (HostSlotMiddleware), so the shop and its CDN each get
        # their own per-host share even where they share an address (the replica).
        "CONCURRENT_REQUESTS_PER_DOMAIN": per_host,
        "CONCURRENT_REQUESTS": per_host * 2,
        # Keeps CONCURRENT_REQUESTS_PER_DOMAIN a hard limit with no download delay (Scrapy 2.19).
        "DOWNLOADER": "crawler.downloader.PerHostLimitDownloader",
        "DOWNLOAD_HANDLERS": {**{scheme: None for scheme in DISABLED_SCHEMES},
                              **_DOWNLOAD_HANDLERS[settings.http_client]},
        "AUTOTHROTTLE_ENABLED": settings.autothrottle,
        "AUTOTHROTTLE_START_DELAY": max(settings.download_delay, 0.1),
        "AUTOTHROTTLE_MAX_DELAY": settings.retry_after_cap,
        "AUTOTHROTTLE_TARGET_CONCURRENCY": float(per_host),
        "DOWNLOAD_TIMEOUT": settings.download_timeout,
        # Pages, JSON and robots.txt are capped at max_page_bytes; photo requests carry their
        # own cap (meta download_maxsize = max_image_bytes).
        "DOWNLOAD_MAXSIZE": settings.max_page_bytes,
        "DOWNLOAD_WARNSIZE": 0,
        "RETRY_ENABLED": True,
        "RETRY_TIMES": settings.retry_times,
        "RETRY_HTTP_CODES": [500, 502, 503, 504, 429],
        "RETRY_AFTER_CAP": settings.retry_after_cap,
        "RETRY_GIVE_UP_LOG_LEVEL": "WARNING",
        # The WAF cookie is managed by WafCookieMiddleware; nothing else should send cookies.
        "COOKIES_ENABLED": False,
        # A photo response yields one item: Scrapy's default (100) starts 100 worker tasks for
        # every response, which cost more CPU than the download itself.
        "CONCURRENT_ITEMS": 1,
        # The photo pipeline's decode + S3 PUT threads (at most the minio client's 10 connections)
        # and the most manifest rows one group-committed transaction takes. Worker processes
        # instead of threads were measured slower (more CPU per photo on a 2-core machine).
        "SHOPLENS_PHOTO_THREADS": min(10, max(2, 2 * per_host)),
        "SHOPLENS_PHOTO_BATCH": 200,
        "TELNETCONSOLE_ENABLED": False,
        # The crawl process is CPU-bound on one interpreter (docs/benchmarks.md, crawl
        # economics): uvloop's event loop, and stats without Scrapy's per-access wrapper, each
        # save a few percent of its CPU per photo.
        "ASYNCIO_EVENT_LOOP": "uvloop.Loop",
        "STATS_CLASS": "crawler.stats.PlainStatsCollector",
        "REMOTE_CONTROL_ENABLED": False,
        "LOG_LEVEL": "INFO",
        "LOGSTATS_INTERVAL": 30,
        "DOWNLOADER_MIDDLEWARES": {
            "crawler.middlewares.HostAllowListMiddleware": 40,
            "crawler.middlewares.HostSlotMiddleware": 45,
            "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
            "crawler.middlewares.RetryAfterMiddleware": 550,
            # Between HttpCompressionMiddleware (590) and MetaRefreshMiddleware (580): it reads
            # the decoded challenge page before a meta refresh in it could be followed.
            "crawler.middlewares.WafCookieMiddleware": 585,
            # Per-request CPU for nothing here (profiled, docs/benchmarks.md): Scrapy's offsite
            # filter lets everything through without ``allowed_domains`` (HostAllowListMiddleware
            # is the allow-list, redirects included); no HTTP credentials; request/response byte
            # statistics (the spider counts requests itself).
            "scrapy.downloadermiddlewares.offsite.OffsiteMiddleware": None,
            "scrapy.downloadermiddlewares.httpauth.HttpAuthMiddleware": None,
            "scrapy.downloadermiddlewares.stats.DownloaderStats": None,
        },
        # No depth limit is set (Depth only keeps statistics then); the URLs are the site
        # adapter's, of fixed shape; the spider copies no response.meta into its requests.
        "SPIDER_MIDDLEWARES": {
            "scrapy.spidermiddlewares.depth.DepthMiddleware": None,
            "scrapy.spidermiddlewares.urllength.UrlLengthMiddleware": None,
            "scrapy.spidermiddlewares.metacopy.MetaCopyDetectionMiddleware": None,
            "crawler.middlewares.CallbackGuardMiddleware": 950,
        },
        "ITEM_PIPELINES": {"crawler.pipelines.ReviewPhotoPipeline": 300},
    }
    if crawls_in_process > 1:
        # Innermost (after HttpCacheMiddleware, 900): holds a host's place only while the
        # request is in the downloader.
        config["DOWNLOADER_MIDDLEWARES"]["crawler.middlewares.SharedHostGate"] = 950
        # One robots.txt per host for the whole process, not one per category.
        config["DOWNLOADER_MIDDLEWARES"].update({
            "scrapy.downloadermiddlewares.robotstxt.RobotsTxtMiddleware": None,
            "crawler.middlewares.SharedRobotsTxtMiddleware": 100})
    return config

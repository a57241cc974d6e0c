"""Scrapy settings for the crawl, derived from shoplens ``Settings`` (politeness lives here)."""
from __future__ import annotations

from shoplens.config import Settings


def scrapy_settings(settings: Settings) -> dict:
    per_host = settings.concurrent_per_host
    return {
        "SHOPLENS_SETTINGS": settings,
        "BOT_NAME": "shoplens",
        "USER_AGENT": settings.user_agent,
        "ROBOTSTXT_OBEY": settings.obey_robots,
        "DOWNLOAD_DELAY": settings.download_delay,
        "DOWNLOAD_DELAY_JITTER": 0.5,  # +-50% around DOWNLOAD_DELAY
        # Scrapy keys its slots by host name; the shop and its CDN are separate hosts on the real
        # site, so the global cap allows each to use its own per-host share.
        "CONCURRENT_REQUESTS_PER_DOMAIN": per_host,
        "CONCURRENT_REQUESTS": per_host * 2,
        "AUTOTHROTTLE_ENABLED": settings.autothrottle,
        "AUTOTHROTTLE_START_DELAY": max(settings.download_delay, 0.1),
        "AUTOTHROTTLE_MAX_DELAY": settings.retry_after_cap,
        "AUTOTHROTTLE_TARGET_CONCURRENCY": float(per_host),
        "DOWNLOAD_TIMEOUT": settings.download_timeout,
        "DOWNLOAD_MAXSIZE": settings.max_image_bytes,
        "DOWNLOAD_WARNSIZE": 0,
        "RETRY_ENABLED": True,
        "RETRY_TIMES": settings.retry_times,
        "RETRY_HTTP_CODES": [500, 502, 503, 504, 429],
        "RETRY_AFTER_CAP": settings.retry_after_cap,
        "RETRY_GIVE_UP_LOG_LEVEL": "WARNING",
        # The WAF cookie is managed by WafCookieMiddleware; nothing else should send cookies.
        "COOKIES_ENABLED": False,
        # The photo pipeline's blocking work (decode, S3 PUT, manifest insert) runs in this pool.
        "REACTOR_THREADPOOL_MAXSIZE": 16,
        "TELNETCONSOLE_ENABLED": False,
        "REMOTE_CONTROL_ENABLED": False,
        "LOG_LEVEL": "INFO",
        "LOGSTATS_INTERVAL": 30,
        "DOWNLOADER_MIDDLEWARES": {
            "crawler.middlewares.HostAllowListMiddleware": 40,
            "scrapy.downloadermiddlewares.retry.RetryMiddleware": None,
            "crawler.middlewares.RetryAfterMiddleware": 550,
            "crawler.middlewares.WafCookieMiddleware": 700,
        },
        "ITEM_PIPELINES": {"crawler.pipelines.ReviewPhotoPipeline": 300},
    }

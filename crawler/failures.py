"""Turning a failed download into the short reason code stored in ``crawl_failures.reason``."""
from __future__ import annotations

from scrapy.exceptions import IgnoreRequest
from scrapy.exceptions import (CannotResolveHostError, DownloadCancelledError,
                               DownloadConnectionRefusedError, DownloadFailedError,
                               DownloadTimeoutError, ResponseDataLossError)
from scrapy.spidermiddlewares.httperror import HttpError
from twisted.internet import error as twisted_errors

from crawler.browser import BrowserError
from crawler.middlewares import OffsiteRequest, WafChallenged

# The stages whose requests download an image (a review photo, a product's catalogue image).
IMAGE_STAGES = ("image", "catalogue_image")


def classify(exc: BaseException, stage: str | None) -> tuple[str, str]:
    """(reason code, human detail) for an exception an errback received."""
    detail = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, HttpError):
        return f"http_{exc.response.status}", f"HTTP {exc.response.status} after retries"
    if isinstance(exc, OffsiteRequest):
        return ("offsite_redirect" if exc.redirected_from else "offsite"), str(exc)
    if isinstance(exc, (DownloadTimeoutError, twisted_errors.TimeoutError)):
        return "timeout", detail
    if isinstance(exc, ResponseDataLossError):
        return "truncated", detail
    if isinstance(exc, DownloadCancelledError):
        # Scrapy cancels a body above DOWNLOAD_MAXSIZE (= max_image_bytes).
        return ("image_too_large" if stage in IMAGE_STAGES else "too_large"), detail
    if isinstance(exc, BrowserError):
        return "waf_cookie", detail
    if isinstance(exc, WafChallenged):
        return "waf_challenge", str(exc)
    if isinstance(exc, (DownloadConnectionRefusedError, CannotResolveHostError,
                        twisted_errors.ConnectError, DownloadFailedError,
                        twisted_errors.ConnectionLost, twisted_errors.ConnectionDone)):
        return "connection_error", detail
    if isinstance(exc, IgnoreRequest):
        text = str(exc)
        return ("robots_disallowed" if "robots" in text.lower() else "ignored"), detail
    # Any other download error (the exception's type is in the detail): one known reason, so
    # that docs/operations.md can list every reason a night records.
    return "download_error", detail

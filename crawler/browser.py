"""Obtaining the shop's WAF cookie by rendering one of its HTML pages in headless Chromium.

The WAF computes its token in page JavaScript, so only a real browser gets it. The browser may only
talk to allow-listed hosts, and it skips images, fonts and media it does not need.
"""
from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
_SKIPPED_RESOURCES = {"image", "font", "media", "stylesheet"}


class BrowserError(RuntimeError):
    """The browser could not obtain the shop's cookies."""


def host_allowed(url: str, allowed: set[str]) -> bool:
    """``allowed`` holds ``host`` (any port) or ``host:port`` entries."""
    parts = urlsplit(url)
    return parts.netloc in allowed or (parts.hostname or "") in allowed


async def acquire_cookies(page_url: str, *, chromium_path: str, user_agent: str,
                          allowed_hosts: set[str], timeout_s: float = 20.0,
                          attempts: int = 3) -> dict[str, str]:
    """Open ``page_url``, let its scripts run, and return the cookies set for its origin."""
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright

    last_problem = "no attempt made"
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium_path, headless=True,
                                               args=CHROMIUM_ARGS)
            try:
                context = await browser.new_context(user_agent=user_agent)
                page = await context.new_page()

                async def gatekeeper(route):
                    req = route.request
                    if (not host_allowed(req.url, allowed_hosts)
                            or req.resource_type in _SKIPPED_RESOURCES):
                        await route.abort()
                    else:
                        await route.continue_()

                await page.route("**/*", gatekeeper)
                for attempt in range(1, attempts + 1):
                    try:
                        response = await page.goto(page_url, wait_until="load",
                                                   timeout=timeout_s * 1000)
                    except PlaywrightError as exc:
                        last_problem = f"navigation failed: {exc.message.splitlines()[0]}"
                        response = None
                    if response is not None and response.status >= 400:
                        last_problem = f"HTTP {response.status}"
                    elif response is not None:
                        cookies = await context.cookies([page_url])
                        if cookies:
                            return {c["name"]: c["value"] for c in cookies}
                        last_problem = "page set no cookie"
                    logger.info("cookie attempt %d/%d on %s: %s", attempt, attempts, page_url,
                                last_problem)
                    await asyncio.sleep(min(2.0, 0.25 * 2 ** attempt))
            finally:
                await browser.close()
    except PlaywrightError as exc:
        raise BrowserError(f"chromium at {chromium_path}: {exc.message.splitlines()[0]}") from exc
    raise BrowserError(f"no cookie from {page_url} after {attempts} attempts ({last_problem})")

"""Obtaining the shop's WAF cookie by rendering one of its HTML pages in headless Chromium.

The WAF computes its token in page JavaScript, so only a real browser gets it. The browser may only
talk to allow-listed hosts, and it skips images, fonts and media it does not need.
"""
from __future__ import annotations

import asyncio
import logging
import os
from urllib.parse import urljoin, urlsplit

logger = logging.getLogger(__name__)

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
_SKIPPED_RESOURCES = {"image", "font", "media", "stylesheet"}
WEB_SCHEMES = frozenset({"http", "https"})


# Chromium makes its singleton socket in a new folder under $TMPDIR, and a Unix socket's path
# holds at most 107 bytes: under a deeper temporary folder (a CI workspace, a test's tmp_path)
# it exits as soon as it starts, which Playwright reports only as "browser has been closed".
CHROMIUM_TMPDIR_MAX = 60


class BrowserError(RuntimeError):
    """The browser could not obtain the shop's cookies."""


def chromium_env() -> dict[str, str] | None:
    """The browser's environment: this process's, with TMPDIR=/tmp when $TMPDIR is too deep for
    Chromium (None: inherit it as it is)."""
    if len(os.environ.get("TMPDIR", "")) <= CHROMIUM_TMPDIR_MAX or not os.path.isdir("/tmp"):
        return None
    return {**os.environ, "TMPDIR": "/tmp"}


def host_allowed(url: str, allowed: set[str]) -> bool:
    """``allowed`` holds ``host`` (any port) or ``host:port`` entries."""
    try:
        parts = urlsplit(url)
        hostname = parts.hostname or ""
    except ValueError:  # e.g. a malformed IPv6 literal
        return False
    return bool(hostname) and (parts.netloc in allowed or hostname in allowed)


def url_allowed(url: str, schemes: set[str], allowed: set[str]) -> bool:
    """An ``http(s)`` URL of one of ``schemes`` to an allowed host; ``file:``, ``data:``,
    ``ftp:``, ``s3:``, ``blob:``, ``ws:`` ... never, even with an allowed host name."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return False
    return scheme in schemes and scheme in WEB_SCHEMES and host_allowed(url, allowed)


async def acquire_cookies(page_url: str, *, chromium_path: str, user_agent: str,
                          allowed_hosts: set[str], allowed_schemes: set[str] | None = None,
                          timeout_s: float = 20.0, attempts: int = 3) -> dict[str, str]:
    """Open ``page_url``, let its scripts run, and return the cookies set for its origin.

    Every request of the whole browser context (the page, its redirects, popups it opens,
    workers) passes the allow-list; service workers are blocked, since their requests would
    bypass the route.
    """
    schemes = set(allowed_schemes or {urlsplit(page_url).scheme})
    from playwright.async_api import Error as PlaywrightError
    from playwright.async_api import async_playwright

    last_problem = "no attempt made"
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium_path, headless=True,
                                               args=CHROMIUM_ARGS, env=chromium_env())
            try:
                context = await browser.new_context(user_agent=user_agent,
                                                    service_workers="block")

                async def gatekeeper(route):
                    req = route.request
                    if (not url_allowed(req.url, schemes, allowed_hosts)
                            or req.resource_type in _SKIPPED_RESOURCES):
                        await route.abort()
                        return
                    # Fetched here without following redirects, and a redirect is handed to the
                    # browser only when its target passes the gate too (a continued request's
                    # redirects would be followed unchecked).
                    try:
                        response = await route.fetch(max_redirects=0,
                                                     timeout=timeout_s * 1000)
                    except PlaywrightError:
                        await route.abort()
                        return
                    location = response.headers.get("location")
                    if 300 <= response.status < 400 and location is not None and not url_allowed(
                            urljoin(req.url, location), schemes, allowed_hosts):
                        await route.abort("blockedbyclient")
                        return
                    await route.fulfill(response=response)

                # On the context, not the page: popups and workers are covered too.
                await context.route("**/*", gatekeeper)
                await context.route_web_socket("**/*", _refuse_web_socket)
                page = await context.new_page()
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


async def _refuse_web_socket(ws) -> None:
    await ws.close()  # never connected to the server: the cookie needs no web socket

"""The HTML the shop host serves: Next.js-style pages, robots.txt, WAF refusals, error pages."""
from __future__ import annotations

import html
import json

from .stats import ROBOTS_DISALLOW

ROBOTS_TXT = "User-agent: *\n" + "".join(f"Disallow: {p}\n" for p in ROBOTS_DISALLOW) + "Allow: /\n"

ACCESS_DENIED = ("<!DOCTYPE html><html><head><title>Access Denied</title></head><body>"
                 "<h1>Access Denied</h1><p>You don't have permission to access this resource.</p>"
                 "<p>Reference #{reference}</p></body></html>")

# The WAF's JavaScript challenge, served in place of a refused JSON answer when the replica runs
# with ``--waf-challenge-page``: the cookie script, then a reload, and status 200.
CHALLENGE_PAGE = ('<!DOCTYPE html><html lang="ko"><head><meta charset="utf-8">'
                  "<title>잠시만 기다려 주세요</title>{waf_script}"
                  "<script>setTimeout(function(){{location.reload();}},50);</script></head>"
                  "<body><noscript>JavaScript를 사용하도록 설정해 주세요.</noscript></body></html>")

ERROR_PAGE = ("<!DOCTYPE html><html><head><title>{status} | 오늘의집</title></head><body>"
              "<h1>{status}</h1><p>{message}</p></body></html>")


def _next_data_script(data: dict, splice: str | None = None) -> str:
    # "</" must not close the script element early; JSON allows the escaped solidus.
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")
    if splice is not None:  # hostile data: raw JSON text where the sentinel string stands
        from .hostile import SENTINEL

        body = body.replace(json.dumps(SENTINEL), splice, 1)
    return f'<script id="__NEXT_DATA__" type="application/json">{body}</script>'


def next_page(title: str, next_data: dict, build_id: str, waf_script: str, main_html: str = "",
              splice: str | None = None) -> str:
    return (
        '<!DOCTYPE html><html lang="ko"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<script src="/_next/static/{build_id}/_buildManifest.js" defer></script>'
        f"{waf_script}</head><body><div id=\"__next\">{main_html}</div>"
        f"{_next_data_script(next_data, splice)}</body></html>"
    )


def ranks_page(build_id: str, category_id: str, waf_script: str) -> str:
    data = {"props": {"pageProps": {}, "__N_SSP": True}, "page": "/ranks",
            "query": {"type": "best", "category_id": category_id}, "buildId": build_id,
            "isFallback": False, "gssp": True, "locale": "ko-KR", "locales": ["ko-KR"],
            "defaultLocale": "ko-KR", "scriptLoader": []}
    return next_page("베스트 | 오늘의집", data, build_id, waf_script,
                     '<main><h1>베스트</h1><div class="ranks-loading">불러오는 중…</div></main>')


def product_page(build_id: str, product_id: int, name: str, queries: list,
                 waf_script: str, splice: str | None = None) -> str:
    data = {"props": {"pageProps": {"dehydratedState": {"mutations": [], "queries": queries}},
                      "__N_SSP": True},
            "page": "/goods/[id]", "query": {"id": str(product_id)}, "buildId": build_id,
            "isFallback": False, "gssp": True, "locale": "ko-KR", "locales": ["ko-KR"],
            "defaultLocale": "ko-KR", "scriptLoader": []}
    return next_page(f"{name} | 오늘의집", data, build_id, waf_script,
                     f"<main><h1>{html.escape(name)}</h1></main>", splice)


def build_manifest_js(build_id: str) -> str:
    return ("self.__BUILD_MANIFEST={__rewrites:{afterFiles:[],beforeFiles:[],fallback:[]},"
            f'"/ranks":["static/chunks/pages/ranks-{build_id[:8]}.js"],'
            f'"/goods/[id]":["static/chunks/pages/goods/[id]-{build_id[8:16]}.js"]}};'
            "self.__BUILD_MANIFEST_CB&&self.__BUILD_MANIFEST_CB()")


def challenge_page(waf_script: str) -> str:
    return CHALLENGE_PAGE.format(waf_script=waf_script)


def error_page(status: int, message: str) -> str:
    return ERROR_PAGE.format(status=status, message=html.escape(message))

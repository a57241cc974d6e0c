"""aiohttp routes of the two replica hosts: the shop (pages, JSON, admin) and the image CDN."""
from __future__ import annotations

import asyncio
import json
import secrets

from aiohttp import web

from . import hostile, pages, payloads
from .catalog import Product
from .cdn import BadImageParams, ImageParams, corrupt_body
from .runtime import ReplicaRuntime
from .stats import Stats
from .waf import COOKIE_NAME

RUNTIME = web.AppKey("runtime", ReplicaRuntime)
HOST_KEY = web.AppKey("host_key", str)
JSON_TYPE = "application/json; charset=utf-8"
HTML_TYPE = "text/html; charset=utf-8"
OFFSITE_HOST = "127.0.0.2"


def _json(data, status: int = 200) -> web.Response:
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return web.Response(body=body, status=status, headers={"Content-Type": JSON_TYPE})


def _html(text: str, status: int = 200, headers: dict | None = None) -> web.Response:
    return web.Response(body=text.encode("utf-8"), status=status,
                        headers={"Content-Type": HTML_TYPE, **(headers or {})})


@web.middleware
async def track_requests(request: web.Request, handler):
    """Stats for every request except the harness's own (header X-Replica-Admin: 1)."""
    if request.headers.get("X-Replica-Admin") == "1":
        return await handler(request)
    stats: Stats = request.app[RUNTIME].stats
    route_name = request.match_info.route.name or "other"
    record = stats.begin(request.app[HOST_KEY], request.path, route_name.split(":")[0],
                         request.headers.get("User-Agent", ""))
    try:
        if request.app[RUNTIME].latency:  # a server across a network: the answer comes later
            await asyncio.sleep(request.app[RUNTIME].latency)
        response = await handler(request)
        stats.by_status[response.status] += 1
        return response
    except web.HTTPException as exc:
        stats.by_status[exc.status] += 1
        raise
    finally:
        stats.end(record)


class Handlers:
    """Request handlers; fault injection happens only here, after the WAF and input checks."""

    def __init__(self, runtime: ReplicaRuntime):
        self.rt = runtime

    # --- faults ------------------------------------------------------------------------------
    def _draw(self, request: web.Request, surface: str) -> str | None:
        # Drawn on the path, not the URL, so shops on different ports fault alike for a seed.
        kind = self.rt.faults.draw(surface, request.path_qs)
        if kind:
            self.rt.record_fault(str(request.url), kind)
        return kind

    async def _early_fault(self, request: web.Request, kind: str | None) -> web.StreamResponse | None:
        """Faults answered without the real body; 'hang' delays, then lets the real answer go."""
        if kind == "500":
            return _html(pages.error_page(500, "일시적인 오류가 발생했습니다."), status=500)
        if kind == "429":
            return _html(pages.error_page(429, "Too Many Requests"), status=429,
                         headers={"Retry-After": "1"})
        if kind == "html":
            return _html(pages.error_page(200, "점검 중입니다. 잠시 후 다시 시도해 주세요."))
        if kind == "offsite":
            return web.Response(status=302, headers={
                "Location": f"http://{OFFSITE_HOST}:{self.rt.cdn_port}{request.path_qs}"})
        if kind == "hang":
            await asyncio.sleep(self.rt.hang_seconds)
        return None

    async def _deliver(self, request: web.Request, kind: str | None, body: bytes,
                       content_type: str) -> web.StreamResponse:
        if kind == "corrupt":
            body, content_type = corrupt_body(body), "image/jpeg"
        if kind == "truncate":
            response = web.StreamResponse(headers={"Content-Type": content_type})
            response.content_length = len(body)
            await response.prepare(request)
            await response.write(body[: len(body) // 2])
            request.protocol.force_close()  # the connection closes short of Content-Length
            return response
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _json_answer(self, request: web.Request, make) -> web.StreamResponse:
        kind = self._draw(request, "json")
        early = await self._early_fault(request, kind)
        if early is not None:
            return early
        payload = make()
        text = payload if isinstance(payload, str) else json.dumps(  # str: JSON text already
            payload, ensure_ascii=False, separators=(",", ":"))
        return await self._deliver(request, kind, text.encode("utf-8"), JSON_TYPE)

    async def _page_answer(self, request: web.Request, make) -> web.StreamResponse:
        early = await self._early_fault(request, self._draw(request, "page"))
        return early if early is not None else _html(make())

    # --- WAF ---------------------------------------------------------------------------------
    def _blocked(self, request: web.Request, needs_referer: bool) -> web.Response | None:
        reason = self.rt.waf.check(request.cookies.get(COOKIE_NAME))
        if reason is None and needs_referer:
            referer = request.headers.get("Referer", "")
            origin = f"{request.scheme}://{request.host}"  # the origin the client addressed
            if not (referer == origin or referer.startswith(origin + "/")):
                reason = "no_referer"
        if reason is None:
            return None
        self.rt.stats.blocked[reason] += 1
        if self.rt.waf.challenge_page:
            return _html(pages.challenge_page(self.rt.waf.script()))  # status 200
        return _html(pages.ACCESS_DENIED.format(reference=secrets.token_hex(8)), status=403)

    # --- shop --------------------------------------------------------------------------------
    async def robots(self, request: web.Request) -> web.Response:
        return web.Response(text=pages.ROBOTS_TXT, content_type="text/plain")

    async def ranks_page(self, request: web.Request) -> web.StreamResponse:
        category_id = request.query.get("category_id", "")
        catalog = self.rt.catalog
        return await self._page_answer(request, lambda: pages.ranks_page(
            catalog.build_id, category_id, self.rt.waf.script()))

    async def build_manifest(self, request: web.Request) -> web.Response:
        build_id = request.match_info["build_id"]
        if build_id != self.rt.catalog.build_id:
            return web.Response(status=404, text="Not Found")
        return web.Response(text=pages.build_manifest_js(build_id),
                            content_type="application/javascript")

    async def ranks_data(self, request: web.Request) -> web.StreamResponse:
        blocked = self._blocked(request, needs_referer=False)
        if blocked:
            return blocked
        if request.match_info["build_id"] != self.rt.catalog.build_id:
            return _json({"notFound": True}, status=404)  # as after a deploy
        category_id = request.query.get("category_id", "")
        return await self._json_answer(request, lambda: payloads.ranks_data(
            self.rt.catalog, category_id, self.rt.cdn_url))

    def _product(self, raw: str | None) -> Product | None:
        if not raw or not raw.isdigit():
            return None
        return self.rt.catalog.products.get(int(raw))

    async def product_page(self, request: web.Request) -> web.StreamResponse:
        product = self._product(request.match_info["product_id"])
        if product is None:
            return _html(pages.error_page(404, "존재하지 않는 상품입니다."), status=404)
        catalog = self.rt.catalog
        bad = self.rt.hostile.get(product.id)

        def make() -> str:
            queries, splice = payloads.product_page_queries(catalog, product, self.rt.cdn_url), None
            if bad is not None and bad.kind in hostile.PRODUCT_PAGE_KINDS:
                queries, splice = hostile.product_queries(queries, bad)
                self.rt.record_fault(str(request.url), hostile.FAULT_NAME)
            return pages.product_page(catalog.build_id, product.id, product.name, queries,
                                      self.rt.waf.script(), splice=splice)

        return await self._page_answer(request, make)

    async def reviews(self, request: web.Request) -> web.StreamResponse:
        blocked = self._blocked(request, needs_referer=True)
        if blocked:
            return blocked
        query = request.query
        try:
            page = int(query.get("page", "1"))
            per = int(query.get("per", "5"))
        except ValueError:
            return _json({"error": "page and per must be integers"}, status=400)
        order = query.get("order", "best") or "best"
        if page < 1 or not 1 <= per <= 50 or order not in {"best", "recent"}:
            return _json({"error": "page >= 1, per in 1..50, order best|recent"}, status=400)
        product = self._product(query.get("productionId"))
        if product is None:
            return _json({"error": "production not found"}, status=404)
        bad = self.rt.hostile.get(product.id)

        def make():
            data = payloads.reviews_page(self.rt.catalog, product, order, page, per,
                                         self.rt.cdn_url)
            if bad is None or bad.kind in hostile.PRODUCT_PAGE_KINDS or not any(
                    r["id"] == bad.review_id for r in data["reviews"]):
                return data
            self.rt.record_fault(str(request.url), hostile.FAULT_NAME)
            return hostile.reviews_page(data, bad, self.rt.base_url)

        return await self._json_answer(request, make)

    async def star_counts(self, request: web.Request) -> web.StreamResponse:
        blocked = self._blocked(request, needs_referer=True)
        if blocked:
            return blocked
        product = self._product(request.query.get("productionId"))
        if product is None:
            return _json({"error": "production not found"}, status=404)
        return await self._json_answer(request, lambda: payloads.star_counts(
            self.rt.catalog, product))

    async def disallowed(self, request: web.Request) -> web.Response:
        return _html(pages.error_page(200, "기획전"))

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(status=404)

    # --- admin (robots-disallowed) -----------------------------------------------------------
    async def admin_ground_truth(self, request: web.Request) -> web.Response:
        return _json(await self.rt.ground_truth())

    async def admin_stats(self, request: web.Request) -> web.Response:
        snapshot = self.rt.stats.snapshot()
        snapshot["image_cache"] = {"hits": self.rt.cache.hits, "misses": self.rt.cache.misses}
        return _json(snapshot)

    async def admin_release(self, request: web.Request) -> web.Response:
        raw = request.query.get("n", "1")
        if not raw.isdigit():
            return _json({"error": "n must be a non-negative integer"}, status=400)
        released = await self.rt.release(int(raw))
        return _json({"released": released, "held_back": len(self.rt.catalog.held_back())})

    async def admin_deploy(self, request: web.Request) -> web.Response:
        return _json({"build_id": self.rt.catalog.deploy()})

    async def admin_faults(self, request: web.Request) -> web.Response:
        try:
            self.rt.set_faults(request.query.get("spec", ""))
        except ValueError as exc:
            return _json({"error": str(exc)}, status=400)
        return _json({"faults": self.rt.faults.spec})

    # --- CDN ---------------------------------------------------------------------------------
    async def _image_answer(self, request: web.Request, produce, photo_id: str | None):
        try:
            params = ImageParams.from_query(request.query)
        except BadImageParams as exc:
            return web.Response(status=400, text=str(exc))
        kind = self._draw(request, "image")
        early = await self._early_fault(request, kind)
        if early is not None:
            return early
        image = await produce(params)
        if photo_id and kind in (None, "hang") and not self.rt.catalog.photos[photo_id].bad:
            self.rt.record_served(photo_id, image.sha256)
        return await self._deliver(request, kind, image.body, image.content_type)

    async def photo(self, request: web.Request) -> web.StreamResponse:
        review = self.rt.catalog.photos.get(request.match_info["photo_id"])
        if review is None or not review.published:
            return web.Response(status=404, text="Not Found")
        return await self._image_answer(request, lambda p: self.rt.photo(review, p), review.photo_id)

    async def product_image(self, request: web.Request) -> web.StreamResponse:
        image_id = request.match_info["image_id"]
        product = self.rt.catalog.by_image_id.get(image_id)
        if product is None:
            return web.Response(status=404, text="Not Found")
        return await self._image_answer(request, lambda p: self.rt.product_image(product, p), None)


def build_shop_app(runtime: ReplicaRuntime, host_key: str) -> web.Application:
    app = web.Application(middlewares=[track_requests])
    app[RUNTIME], app[HOST_KEY] = runtime, host_key
    h = Handlers(runtime)
    r = app.router
    r.add_get("/robots.txt", h.robots, name="robots")
    r.add_get("/ranks", h.ranks_page, name="ranks_page")
    r.add_get("/_next/static/{build_id}/_buildManifest.js", h.build_manifest, name="static:manifest")
    r.add_get("/_next/data/{build_id}/ko-KR/ranks.json", h.ranks_data, name="ranks_data")
    r.add_get("/goods/{product_id}", h.product_page, name="product_page")
    r.add_get("/api/goods/reviews", h.reviews, name="reviews")
    r.add_get("/api/goods/reviews/counts-for-stars", h.star_counts, name="star_counts")
    r.add_get("/api/goods/reviews/export", h.disallowed, name="disallowed:export")
    r.add_get("/exhibitions/{tail:.*}", h.disallowed, name="disallowed:exhibitions")
    r.add_get("/favicon.ico", h.favicon, name="static:favicon")
    r.add_get("/__replica/ground-truth.json", h.admin_ground_truth, name="admin:truth")
    r.add_get("/__replica/stats", h.admin_stats, name="admin:stats")
    r.add_post("/__replica/release", h.admin_release, name="admin:release")
    r.add_post("/__replica/deploy", h.admin_deploy, name="admin:deploy")
    r.add_post("/__replica/faults", h.admin_faults, name="admin:faults")
    return app


def build_cdn_app(runtime: ReplicaRuntime, host_key: str) -> web.Application:
    app = web.Application(middlewares=[track_requests])
    app[RUNTIME], app[HOST_KEY] = runtime, host_key
    h = Handlers(runtime)
    app.router.add_get(r"/apne2/any/uploads/cards/snapshots/{photo_id:\d{18}}.jpg", h.photo,
                       name="image:photo")
    app.router.add_get(r"/apne2/any/uploads/productions/v1-{image_id:\d{15}}.jpg",
                       h.product_image, name="catalogue_image:product")
    return app

"""The running replica's state: catalogue, WAF, faults, stats and the CDN's rendered-image cache.

Lives on the server's event loop: handlers and admin calls mutate it from that one thread; only
image decoding/encoding runs in worker threads (and touches nothing but the thread-safe cache).
"""
from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from . import ground_truth, hostile
from .catalog import Catalog, Product, Review
from .cdn import ImageParams, RenderCache, Rendered, bad_photo_body, render, rendered
from .faults import FaultPlan
from .stats import Stats
from .waf import Waf


class ReplicaRuntime:
    def __init__(self, catalog: Catalog, *, faults: str = "", cookie_ttl: float = 3600.0,
                 waf: bool = True, waf_challenge_page: bool = False,
                 hang_seconds: float = 30.0, ground_truth_path: Path | None = None,
                 cache_bytes: int = 256 * 1024 * 1024, image_workers: int | None = None,
                 latency: float = 0.0):
        self.catalog = catalog
        self.waf = Waf(ttl=cookie_ttl)
        self.waf.enabled = waf
        self.waf.challenge_page = waf_challenge_page
        self.faults = FaultPlan(faults, catalog.seed)
        self.hostile = hostile.assign(catalog, self.faults.hostile_fraction, catalog.seed)
        self.stats = Stats()
        self.hang_seconds = hang_seconds
        self.latency = latency
        self.ground_truth_path = ground_truth_path
        self.cache = RenderCache(cache_bytes)
        self.executor = ThreadPoolExecutor(max_workers=image_workers or min(4, os.cpu_count() or 2),
                                           thread_name_prefix="replica-cdn")
        self._rendering: dict[tuple, asyncio.Future] = {}
        self.served: dict[str, set[str]] = defaultdict(set)
        self.fault_log: list[dict] = []
        self.original_sha256: dict[str, str] = {}
        self.base_url = ""
        self.cdn_url = ""
        self.cdn_port = 0

    # --- images ------------------------------------------------------------------------------
    def _original_bytes(self, path: Path) -> bytes:
        key = ("original", str(path))
        hit = self.cache.get(key)
        if hit is not None:
            return hit.body
        body = path.read_bytes()
        self.cache.put(key, Rendered(body, "", ""))
        return body

    def _render_photo(self, review: Review, params: ImageParams | None) -> Rendered:
        original = self._original_bytes(review.photo_path)
        if review.bad:
            return rendered(*bad_photo_body(review.bad, original))
        return rendered(*render(original, params or ImageParams()))

    def _render_product_image(self, product: Product, params: ImageParams) -> Rendered:
        if product.image_bad:
            placeholder = io.BytesIO()
            Image.new("RGB", (400, 400), (236, 236, 236)).save(placeholder, "JPEG", quality=85)
            return rendered(*bad_photo_body(product.image_bad, placeholder.getvalue()))
        photo = next((r for r in product.reviews if r.photo_id and not r.bad), None)
        if photo is None:  # a product without photos still has a catalogue image
            out = io.BytesIO()
            Image.new("RGB", (400, 400), (236, 236, 236)).save(out, "JPEG", quality=85)
            return rendered(*render(out.getvalue(), params))
        return rendered(*render(self._original_bytes(photo.photo_path), params))

    async def _rendered(self, key: tuple, compute) -> Rendered:
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        pending = self._rendering.get(key)
        if pending is None:  # one render per key, however many ask at once
            pending = asyncio.get_running_loop().run_in_executor(self.executor, compute)
            self._rendering[key] = pending

            def finished(future: asyncio.Future) -> None:
                self._rendering.pop(key, None)
                if not future.cancelled() and future.exception() is None:
                    self.cache.put(key, future.result())

            pending.add_done_callback(finished)
        # Shielded: a client hanging up must not cancel the render other requests wait for.
        return await asyncio.shield(pending)

    async def photo(self, review: Review, params: ImageParams) -> Rendered:
        return await self._rendered(("photo", review.photo_id, params),
                                    lambda: self._render_photo(review, params))

    async def product_image(self, product: Product, params: ImageParams) -> Rendered:
        return await self._rendered(("product", product.id, product.image_bad, params),
                                    lambda: self._render_product_image(product, params))

    def record_served(self, photo_id: str, sha256: str) -> None:
        self.served[photo_id].add(sha256)

    def record_fault(self, url: str, kind: str) -> None:
        self.stats.faults[kind] += 1
        self.fault_log.append({"url": url, "kind": kind})

    # --- ground truth ------------------------------------------------------------------------
    async def ensure_original_hashes(self) -> None:
        missing = [r for r in self.catalog.photos.values() if r.photo_id not in self.original_sha256]
        if not missing:
            return

        def digest(review: Review) -> tuple[str, str]:
            original = review.photo_path.read_bytes()
            body = bad_photo_body(review.bad, original)[0] if review.bad else original
            return review.photo_id, hashlib.sha256(body).hexdigest()

        loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(loop.run_in_executor(self.executor, digest, r)
                                         for r in missing))
        self.original_sha256.update(results)

    async def ground_truth(self) -> dict:
        await self.ensure_original_hashes()
        return ground_truth.build(self.catalog, self.cdn_url, self.base_url, self.original_sha256,
                                  self.served, self.fault_log, self.hostile)

    async def write_ground_truth(self) -> None:
        if self.ground_truth_path:
            truth = await self.ground_truth()
            await asyncio.get_running_loop().run_in_executor(
                self.executor, ground_truth.write, truth, self.ground_truth_path)

    async def release(self, count: int) -> list[int]:
        released = self.catalog.release(count)
        await self.write_ground_truth()
        return released

    def set_faults(self, spec: str) -> None:
        self.faults = FaultPlan(spec, self.catalog.seed)
        self.hostile = hostile.assign(self.catalog, self.faults.hostile_fraction,
                                      self.catalog.seed)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)

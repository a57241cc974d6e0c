"""``ReplicaShop``: the replica's two hosts served from a background thread with its own loop."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
from pathlib import Path

from aiohttp import web

from .app import build_cdn_app, build_shop_app
from .catalog import Catalog, build_catalog
from .listings import ProductSource, read_listing, scan_photo_dir
from .runtime import ReplicaRuntime
from .synthetic import synthetic_sources


def load_sources(photos: Path | None = None, listing: Path | None = None, *, seed: int = 0,
                 cache_dir: Path | None = None, synthetic_products: int = 7,
                 synthetic_photos: tuple[int, int] = (6, 25)) -> list[ProductSource]:
    if photos and listing:
        raise ValueError("give --photos or --listing, not both")
    if photos:
        return scan_photo_dir(Path(photos))
    if listing:
        return read_listing(Path(listing))
    return synthetic_sources(seed, cache_dir, synthetic_products, synthetic_photos)


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.listen(512)
    sock.setblocking(False)
    return sock


class ReplicaShop:
    """The replica shop; ``port=0`` picks free ports. Use as a context manager or start()/stop().

    Admin helpers (``ground_truth``, ``stats``, ``release``, ``deploy``, ``set_faults``) run on
    the server's loop, so they are safe to call from the test's thread while a crawl is running.
    """

    def __init__(self, photos: Path | str | None = None, listing: Path | str | None = None, *,
                 seed: int = 0, host: str = "127.0.0.1", port: int = 0,
                 cdn_port: int | None = None, faults: str = "", bad_photos: float = 0.0,
                 hold_back: int = 0, ground_truth_path: Path | str | None = None,
                 hang_seconds: float = 30.0, cookie_ttl: float = 3600.0, waf: bool = True,
                 waf_challenge_page: bool = False,
                 cache_dir: Path | str | None = None, synthetic_products: int = 7,
                 synthetic_photos: tuple[int, int] = (6, 25),
                 sources: list[ProductSource] | None = None, latency: float = 0.0):
        self.host = host
        self.port = port
        self.cdn_port = cdn_port if cdn_port is not None else (port + 1 if port else 0)
        sources = sources if sources is not None else load_sources(
            Path(photos) if photos else None, Path(listing) if listing else None, seed=seed,
            cache_dir=Path(cache_dir) if cache_dir else None,
            synthetic_products=synthetic_products, synthetic_photos=synthetic_photos)
        self.catalog: Catalog = build_catalog(sources, seed, bad_photos, hold_back)
        self.runtime = ReplicaRuntime(
            self.catalog, faults=faults, cookie_ttl=cookie_ttl, waf=waf,
            waf_challenge_page=waf_challenge_page, hang_seconds=hang_seconds,
            ground_truth_path=Path(ground_truth_path) if ground_truth_path else None,
            latency=latency)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runners: list[web.AppRunner] = []

    @property
    def base_url(self) -> str:
        return self.runtime.base_url

    @property
    def cdn_url(self) -> str:
        return self.runtime.cdn_url

    # --- lifecycle -----------------------------------------------------------------------------
    async def serve(self) -> None:
        """Bind both hosts and start answering (on the current loop)."""
        shop_sock, cdn_sock = _bind(self.host, self.port), None
        try:
            cdn_sock = _bind(self.host, self.cdn_port)
        except OSError:
            shop_sock.close()
            raise
        self.port, self.cdn_port = shop_sock.getsockname()[1], cdn_sock.getsockname()[1]
        rt = self.runtime
        rt.base_url = f"http://{self.host}:{self.port}"
        rt.cdn_url = f"http://{self.host}:{self.cdn_port}"
        rt.cdn_port = self.cdn_port
        for app, sock in ((build_shop_app(rt, f"{self.host}:{self.port}"), shop_sock),
                          (build_cdn_app(rt, f"{self.host}:{self.cdn_port}"), cdn_sock)):
            runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await runner.setup()
            await web.SockSite(runner, sock, shutdown_timeout=1.0, backlog=512).start()
            self._runners.append(runner)
        await rt.write_ground_truth()

    async def shutdown(self) -> None:
        await self.runtime.write_ground_truth()
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()
        self.runtime.close()

    def start(self, timeout: float = 120.0) -> "ReplicaShop":
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.serve())
            except BaseException as exc:  # reported to start()'s caller
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.shutdown())
            loop.close()

        self._thread = threading.Thread(target=run, name="replica-shop", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise TimeoutError("replica shop did not start")
        if failure:
            self._thread.join()
            raise failure[0]
        return self

    def stop(self) -> None:
        if self._loop and self._thread and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> "ReplicaShop":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- admin, from any thread -------------------------------------------------------------
    def _call(self, coro_or_fn, *args):
        if self._loop is None:
            raise RuntimeError("the replica shop is not running")

        async def wrapper():
            result = coro_or_fn(*args)
            return await result if asyncio.iscoroutine(result) else result

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout=300)

    def ground_truth(self) -> dict:
        # A JSON round trip gives the caller its own copy, exactly what the HTTP endpoint serves.
        return json.loads(json.dumps(self._call(self.runtime.ground_truth), ensure_ascii=False))

    def stats(self) -> dict:
        return json.loads(json.dumps(self._call(self.runtime.stats.snapshot)))

    def release(self, n: int) -> list[int]:
        return self._call(self.runtime.release, n)

    def deploy(self) -> str:
        return self._call(self.catalog.deploy)

    def set_faults(self, spec: str) -> None:
        self._call(self.runtime.set_faults, spec)

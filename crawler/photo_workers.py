"""Validate and store review photos in worker processes, off the crawl process's GIL.

The Pillow decode and the minio PUT (pure-Python HTTP and request signing) hold the GIL for
~2 ms per photo. Run in threads of the crawl process, they made every socket call of Scrapy's
event loop wait for the GIL (measured ~0.8 ms per epoll/recv/send call in a category crawl), so
the reactor, not the network, set the pace. In worker processes they cost the reactor only
a pickled body on a pipe.

Workers are forked when the pool starts (the spider opens, before any download), so they start
with the crawl's modules already imported; each builds its own minio client. A worker exits
with its parent, even when the parent is killed with SIGKILL (no orphans after a crash).
"""
from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from crawler.images import IMAGE_CONTENT_TYPES, ValidImage, validate_image
from shoplens.config import Settings
from shoplens.store import ObjectStore, image_key

__all__ = ["BrokenProcessPool", "PhotoWorkers", "StoreUnavailable"]

_PR_SET_PDEATHSIG = 1


class StoreUnavailable(RuntimeError):
    """The object store did not accept a write (down, refusing, out of space)."""


class PhotoWorkers:
    """A pool of processes that validate photo bytes and PUT them under their content address."""

    def __init__(self, settings: Settings, processes: int):
        self.settings = settings
        self.processes = max(1, processes)
        self._pool: ProcessPoolExecutor | None = None

    def start(self) -> None:
        """Fork the workers now (the pool would otherwise fork them at the first photo)."""
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                self.processes, mp_context=multiprocessing.get_context("fork"),
                initializer=_init_worker, initargs=(self.settings, os.getpid()))
            for _ in range(self.processes):
                self._pool.submit(os.getpid)  # the fork context starts every worker at once

    async def validate_and_store(self, body: bytes, content_type: str | None
                                 ) -> tuple[ValidImage, str]:
        """The image's facts and its object key once its bytes are stored; raises
        ``ImageRejected`` (bytes not worth storing) or ``StoreUnavailable``."""
        self.start()
        assert self._pool is not None
        return await asyncio.wrap_future(
            self._pool.submit(_validate_and_store, body, content_type))

    def shutdown(self) -> None:
        if self._pool is not None:  # queued photos of an aborted crawl are dropped, not stored
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


# --- in the worker processes --------------------------------------------------------------------
_store: ObjectStore | None = None
_settings: Settings | None = None


def _init_worker(settings: Settings, parent_pid: int) -> None:
    global _store, _settings
    _exit_with_parent(parent_pid)
    # Ctrl-C reaches the whole process group: the crawl process decides how to stop, not us;
    # and Scrapy's SIGTERM handler, inherited with the fork, means nothing here.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _settings = settings
    _store = ObjectStore(settings)


def _exit_with_parent(parent_pid: int) -> None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still stops us
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _validate_and_store(body: bytes, content_type: str | None) -> tuple[ValidImage, str]:
    assert _store is not None and _settings is not None
    image = validate_image(body, content_type, max_pixels=_settings.max_image_pixels,
                           max_bytes=_settings.max_image_bytes)
    key = image_key(image.sha256, image.format)
    try:
        _store.put_bytes(key, body, IMAGE_CONTENT_TYPES[image.format])
    except Exception as exc:  # minio raises urllib3/S3 errors of many kinds
        raise StoreUnavailable(f"object store {_settings.s3_endpoint} bucket "
                               f"{_settings.s3_bucket!r} refused a write: "
                               f"{type(exc).__name__}: {str(exc)[:300]}") from None
    return image, key

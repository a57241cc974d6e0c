"""The crawl worker: crawl processes forked from a warm process instead of started cold.

A crawl process (``python -m crawler crawl``) spends ~0.9 s of CPU importing Scrapy, Twisted,
SQLAlchemy, minio and the photo decoder before its first request: most of what an incremental
night costs (docs/benchmarks.md, crawl economics). Here a ``multiprocessing`` forkserver imports
all of that once (this module, its preload) and forks every later crawl process of the calling
process from it: each is still its own process (Twisted's reactor starts fresh in it, a crash or
SIGKILL costs that process only, the caller reads its stats file as before), but starts with
its modules loaded. It pays off for a caller that crawls several times (``shoplens crawl run``,
the benchmarks, a long-lived worker); a caller that crawls once pays the imports once, as before.

The forkserver is started by the first crawl of the calling process and ends with it.
"""
from __future__ import annotations

import collections
import io
import multiprocessing
import multiprocessing.context
import os
import runpy
import sys
import threading
import time
from multiprocessing import forkserver, popen_forkserver, reduction, spawn, util
from multiprocessing.context import set_spawning_popen
from pathlib import Path

# What a crawl process imports (its own modules, and Scrapy's components that
# crawler/scrapy_settings.py leaves enabled), imported by the forkserver when it starts (an
# ImportError is skipped there). None of them installs a reactor (tests/test_crawl_units.py).
CRAWL_MODULES = (
    "crawler.cli", "crawler.run", "crawler.scrapy_settings", "crawler.spiders.reviews",
    "crawler.pipelines", "crawler.middlewares", "crawler.downloader", "crawler.images",
    "crawler.stats", "uvloop",
    "scrapy.crawler", "scrapy.core.engine", "scrapy.core.scheduler", "scrapy.core.scraper",
    "scrapy.core.downloader", "scrapy.core.downloader.handlers.http11", "scrapy.pqueues",
    "scrapy.squeues", "scrapy.dupefilters", "scrapy.statscollectors", "scrapy.logformatter",
    "scrapy.pipelines", "scrapy.spiderloader", "scrapy.utils.request",
    "scrapy.downloadermiddlewares.cookies", "scrapy.downloadermiddlewares.defaultheaders",
    "scrapy.downloadermiddlewares.downloadtimeout",
    "scrapy.downloadermiddlewares.httpcache", "scrapy.downloadermiddlewares.httpcompression",
    "scrapy.downloadermiddlewares.httpproxy", "scrapy.downloadermiddlewares.redirect",
    "scrapy.downloadermiddlewares.robotstxt", "scrapy.downloadermiddlewares.useragent",
    "scrapy.extensions.closespider", "scrapy.extensions.corestats",
    "scrapy.extensions.feedexport", "scrapy.extensions.logcount", "scrapy.extensions.logstats",
    "scrapy.extensions.memdebug", "scrapy.extensions.memusage", "scrapy.extensions.spiderstate",
    "scrapy.extensions.throttle", "scrapy.spidermiddlewares.httperror",
    "scrapy.spidermiddlewares.referer", "scrapy.spidermiddlewares.start",
    # Imported by a crawl even when unused (the remote-control extension, off, imports aiohttp's
    # server) or when the shop's WAF challenges it; the aiohttp client handler by its setting.
    "scrapy.extensions.remote_control", "scrapy.core.downloader.handlers._aiohttp",
    "playwright.async_api",
)


class WorkerUnavailable(RuntimeError):
    """This process cannot fork crawl processes from a forkserver (e.g. it is a daemonic
    process, or the platform has no forkserver): the caller starts them cold instead."""


def worker_pid() -> int | None:
    """The forkserver's pid once started (its CPU and its ended crawl processes' CPU are
    accounted under it), else None."""
    return getattr(forkserver._forkserver, "_forkserver_pid", None)


def run_crawl_process(argv: list[str], env: dict[str, str], log_path: Path,
                      relay=None) -> tuple[int, str]:
    """Run ``python -m crawler *argv`` with environment ``env`` as a process forked from the
    warm forkserver; its log goes to ``relay`` (default: our stderr at the time) as it comes.
    Returns (exit status, its last log lines); a negative status is the signal that ended it.
    :class:`WorkerUnavailable` when the process cannot be forked from it, or when ``env``'s
    PYTHONPATH names a folder this process does not import from (a forked one would not see it).
    """
    added = _not_on_our_path(env.get("PYTHONPATH", ""))
    if added:  # a cold process would import from there (another checkout, a test's hook)
        raise WorkerUnavailable(f"the crawl process's PYTHONPATH adds {added[0]!r}, not on "
                                "this process's path")
    try:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["crawler.worker", *CRAWL_MODULES])
        log_path.touch()
        process = _CrawlProcess(target=_crawl_process, args=(argv, env, str(log_path)),
                                name="shoplens-crawl")
        process.start()
    except (ValueError, AssertionError, OSError) as exc:  # no forkserver, or a daemonic caller
        raise WorkerUnavailable(f"{type(exc).__name__}: {exc}") from exc
    tail: collections.deque[str] = collections.deque(maxlen=30)
    relay = relay or sys.stderr
    ended = threading.Event()
    reader = threading.Thread(target=_follow, args=(log_path, tail, ended, relay), daemon=True)
    reader.start()
    try:
        process.join()
    except BaseException:
        process.kill()  # our own child: never leave a crawler running behind a cancelled task
        process.join()
        raise
    finally:
        ended.set()
        reader.join(timeout=5)
    return process.exitcode, "\n".join(tail)


class _PopenWithoutMain(popen_forkserver.Popen):
    """multiprocessing's forkserver start, except that the child does not import the caller's
    ``__main__`` script again (multiprocessing does, for pickled functions defined there): a
    crawl process needs nothing from it, and the caller may be any program (a benchmark, an
    Airflow task runner). The rest is ``popen_forkserver.Popen._launch`` of Python 3.11."""

    def _launch(self, process_obj):
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        parent_w = os.dup(w)  # the child's sentinel of its parent, as in _launch
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _CrawlProcess(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj):
        return _PopenWithoutMain(process_obj)


def _not_on_our_path(pythonpath: str) -> list[str]:
    """Entries of ``pythonpath`` missing from this process's ``sys.path``, which the forkserver
    shares: a process forked from it imports exactly what a cold one would only without them."""
    ours = {os.path.realpath(p) for p in sys.path if p}
    return [p for p in pythonpath.split(os.pathsep) if p and os.path.realpath(p) not in ours]


def _follow(path: Path, tail: collections.deque, ended: threading.Event, relay) -> None:
    """Relay the lines appended to ``path`` until ``ended`` is set and nothing is left."""
    pending = ""
    with open(path, encoding="utf-8", errors="replace") as log:
        while True:
            finished = ended.is_set()  # read once more after the process ended
            chunk = log.read()
            if chunk:
                pending += chunk
                *lines, pending = pending.split("\n")
                for line in lines:
                    tail.append(line)
                    relay.write(line + "\n")
            elif finished:
                break
            else:
                time.sleep(0.05)
    if pending:
        tail.append(pending)
        relay.write(pending + "\n")


def _crawl_process(argv: list[str], env: dict[str, str], log_path: str) -> None:
    """The forked crawl process: the caller's environment and log file, then ``python -m
    crawler`` itself (crawler/__main__.py), which ends with ``os._exit``."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.clear()
    os.environ.update(env)
    # Run the module as the program it is, exactly as the cold path's subprocess does (it ends
    # the process itself); the worker only launches it, it does not depend on its code.
    sys.argv = ["crawler", *argv]
    runpy.run_module("crawler", run_name="__main__", alter_sys=True)
    os._exit(1)  # not reached: crawler/__main__.py ends with os._exit

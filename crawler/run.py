"""Public entries of the crawl stage: start a run, crawl one category, finish the run.

``crawl_category`` runs Scrapy in a child process (what ``python -m crawler crawl`` runs, forked
from the warm crawl worker, crawler/worker.py, else started as that command): Twisted's reactor
cannot be restarted inside one process, so an Airflow worker or a test can call it any number of
times, and killing the child (even with SIGKILL) is a realistic crash that a rerun recovers from.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from crawler import manifest_writer, worker
from shoplens import summary as run_summary
from shoplens.config import Settings
from shoplens.manifest import engine_for, upgrade
from shoplens.store import ObjectStore, StoreError

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


class CrawlError(RuntimeError):
    """A crawl could not complete (object store or manifest down, crawler crashed)."""


def start_run(settings: Settings, run_key: str) -> int:
    """Migrate the manifest, make sure the bucket exists, and return the run's id (idempotent)."""
    try:
        upgrade(settings.manifest_url)
    except Exception as exc:
        raise CrawlError(f"manifest database {_safe_url(settings.manifest_url)} unavailable: "
                         f"{type(exc).__name__}: {str(exc).strip()[:300]}") from exc
    check_object_store(settings)
    return manifest_writer.ensure_run(settings.manifest_url, run_key, settings.shop_base_url,
                                      settings.public_dict())


def check_object_store(settings: Settings) -> None:
    try:
        ObjectStore(settings).ensure_bucket()
    except (StoreError, Exception) as exc:
        raise CrawlError(f"object store {settings.s3_endpoint} (bucket {settings.s3_bucket!r}) "
                         f"unavailable: {type(exc).__name__}: {str(exc)[:300]}") from exc


def crawl_category(settings: Settings, category_id: str, run_key: str) -> dict:
    """Crawl one category into the run ``run_key`` in a child process; returns its stats."""
    return crawl_categories(settings, [category_id], run_key)[str(category_id)]


def crawl_categories(settings: Settings, category_ids: list[str], run_key: str) -> dict[str, dict]:
    """Crawl several categories into the run ``run_key`` in ONE child process (one interpreter,
    one reactor, the imports and the run lookup paid once), all at once, sharing
    ``settings.concurrent_per_host`` per host (crawler/middlewares.py ``SharedHostGate``);
    returns each category's stats by category id, in order.

    Each category keeps its own outcome: its stats (and their error) reach the run row, and if
    any category failed (no product, an exception in a callback, the manifest lost) this raises
    ``CrawlError`` naming every failed category, after the others ran to their end.
    """
    category_ids = [str(c) for c in category_ids]
    if not category_ids:
        return {}
    with tempfile.TemporaryDirectory(prefix="shoplens-crawl-") as tmp:
        stats_file = Path(tmp) / "stats.json"
        argv = ["crawl", "--run-key", run_key, "--stats-file", str(stats_file)]
        for category_id in category_ids:
            argv += ["--category", category_id]
        env = {**os.environ, **settings_env(settings)}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        started = time.monotonic()
        try:  # forked from the warm crawl worker: the imports are paid once per caller
            returncode, tail = worker.run_crawl_process(argv, env, Path(tmp) / "crawl.log")
        except worker.WorkerUnavailable:
            returncode, tail = _run_relaying_stderr([sys.executable, "-m", "crawler", *argv], env)
        process_s = time.monotonic() - started
        per_category = json.loads(stats_file.read_text()) if stats_file.exists() else None
    which = f"category {category_ids[0]}" if len(category_ids) == 1 else \
        f"categories {', '.join(category_ids)}"
    if not per_category:
        raise CrawlError(f"crawl of {which} (run {run_key}) failed: exit status {returncode}; "
                         f"last log lines:\n{tail}")
    failed = [s for s in per_category if s.get("error")]
    if len(category_ids) == 1 and failed:
        raise CrawlError(f"crawl of {which} (run {run_key}) failed: {failed[0]['error']}")
    if failed:
        reasons = "; ".join(f"category {s.get('category_id')}: {s['error']}" for s in failed)
        raise CrawlError(f"crawl of {len(failed)} of {len(per_category)} categories "
                         f"(run {run_key}) failed: {reasons}")
    if returncode != 0:
        raise CrawlError(f"crawl of {which} (run {run_key}) failed: exit status {returncode}; "
                         f"last log lines:\n{tail}")
    # The child process's whole life, shared by its categories; minus the spiders' time it is
    # the fixed cost of a crawl process: interpreter start, imports, the run lookup, Scrapy's
    # engine start and stop.
    for stats in per_category:
        stats["process_s"] = round(process_s, 3)
        stats["categories_in_process"] = len(per_category)
    return {str(stats["category_id"]): stats for stats in per_category}


def plan_groups(settings: Settings) -> list[list[str]]:
    """The night's crawl processes: ``settings.categories`` in ``settings.crawl_groups`` groups
    (0: ``crawl_parallelism``, so that every crawl slot has a process to run)."""
    return category_groups(settings.categories,
                           settings.crawl_groups or settings.crawl_parallelism)


def category_groups(category_ids, groups: int) -> list[list[str]]:
    """``category_ids`` dealt round-robin into at most ``groups`` non-empty groups (one crawl
    process each): as many as asked, never more than there are categories."""
    ids = [str(c) for c in category_ids]
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    n = min(groups, len(ids))
    return [ids[i::n] for i in range(n)]


def finish_run(settings: Settings, run_key: str) -> dict:
    """Mark the run successful; returns its counts (the run summary's crawl section)."""
    manifest_writer.finish_run_row(settings.manifest_url, run_key, "success", {})
    with engine_for(settings.manifest_url).connect() as conn:
        return {"run_key": run_key, **run_summary.crawl_section(conn, run_key)}


def fail_run(settings: Settings, run_key: str, error: str) -> None:
    manifest_writer.finish_run_row(settings.manifest_url, run_key, "failed", {"error": error})


def settings_env(settings: Settings) -> dict[str, str]:
    """``Settings`` as the ``SHOPLENS_*`` variables that ``Settings.from_env`` reads back."""
    env = {}
    for field in dataclasses.fields(settings):
        value: Any = getattr(settings, field.name)
        if isinstance(value, bool):
            text = "1" if value else "0"
        elif isinstance(value, (tuple, list)):
            text = ",".join(str(v) for v in value)
        elif isinstance(value, dict) or hasattr(value, "keys"):
            text = json.dumps(dict(value), ensure_ascii=False)
        else:
            text = str(value)
        env[f"SHOPLENS_{field.name.upper()}"] = text
    return env


def _run_relaying_stderr(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``cmd``; its log goes to our stderr as it comes, and its last lines are kept."""
    tail: collections.deque[str] = collections.deque(maxlen=30)
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace")

    def relay() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            sys.stderr.write(line)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    try:
        returncode = proc.wait()
    except BaseException:
        proc.kill()  # our own child: never leave a crawler running behind a cancelled task
        proc.wait()
        raise
    reader.join(timeout=5)
    return returncode, "\n".join(tail)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _started_run_id(settings: Settings, run_key: str) -> int:
    """The run's id. A run row exists only once ``start_run`` migrated the manifest and checked
    the bucket for it (the DAG's first task), so a category process skips doing that again
    (Alembic alone costs each process ~0.4 s of CPU); a crawl started on its own starts its run."""
    try:
        return manifest_writer.ensure_run_id(settings.manifest_url, run_key)
    except Exception:  # no such run, no schema yet, or no database: start_run says which
        return start_run(settings, run_key)


def run_spiders(settings: Settings, category_ids: list[str], run_key: str) -> list[dict]:
    """The crawl itself, in this process (the ``python -m crawler crawl`` child): one spider per
    category, all in one reactor at once; their requests share ``concurrent_per_host`` per host
    through ``SharedHostGate``. Returns each category's stats, in order."""
    from scrapy import signals
    from scrapy.crawler import AsyncCrawlerProcess

    from crawler.scrapy_settings import scrapy_settings
    from crawler.spiders.reviews import ReviewsSpider

    cpu = {"imports": time.process_time()}  # interpreter start and imports, before anything
    run_id = _started_run_id(settings, run_key)
    started = time.monotonic()
    scrapy_config = scrapy_settings(settings, crawls_in_process=len(category_ids))
    process = AsyncCrawlerProcess(scrapy_config)
    # Scrapy filters by LOG_LEVEL in its handler, after a record of every "Crawled"/"Scraped"
    # debug line was built: the logger's own level skips building them.
    logging.getLogger("scrapy").setLevel(scrapy_config["LOG_LEVEL"])
    crawlers, finished = [], {}
    for category_id in category_ids:
        crawler = process.create_crawler(ReviewsSpider)

        def closed(spider, reason, _category=str(category_id)):
            finished[_category] = time.monotonic()

        crawler.signals.connect(closed, signal=signals.spider_closed, weak=False)
        process.crawl(crawler, category_id=category_id, run_key=run_key)
        crawlers.append((str(category_id), crawler))
    cpu["setup"] = time.process_time() - cpu["imports"]  # run lookup, Scrapy's crawlers
    process.start()
    cpu["crawl"] = time.process_time() - cpu["setup"] - cpu["imports"]
    per_category = [_category_stats(settings, run_id, run_key, category_id, crawler,
                                    finished.get(category_id, time.monotonic()) - started)
                    for category_id, crawler in crawlers]
    # The process's CPU seconds by phase (shared by its categories; the stats merges excluded).
    for stats in per_category:
        stats["process_cpu_s"] = {k: round(v, 3) for k, v in cpu.items()}
    return per_category


def run_spider(settings: Settings, category_id: str, run_key: str) -> dict:
    """One category, in this process."""
    return run_spiders(settings, [category_id], run_key)[0]


def _category_stats(settings: Settings, run_id: int, run_key: str, category_id: str, crawler,
                    elapsed: float) -> dict:
    raw = crawler.stats.get_stats()
    spider = crawler.spider
    ours = {k.removeprefix("shoplens/"): v for k, v in raw.items()
            if k.startswith("shoplens/") and not k.startswith("shoplens/failures/")}
    failures = {k.removeprefix("shoplens/failures/"): v for k, v in raw.items()
                if k.startswith("shoplens/failures/")}
    first, last = ours.pop("first_photo_request_at", None), ours.pop("last_photo_stored_at", None)
    stats = {
        "category_id": category_id, "run_key": run_key, "run_id": run_id, "pid": os.getpid(),
        **{k: ours.get(k, 0) for k in (
            "products", "products_synced", "products_unchanged", "review_pages", "reviews_seen",
            "reviews_new",
            "photos_requested", "photos_healing", "photos_stored",
            "images_new", "photos_rejected", "photos_over_cap", "bytes_stored",
            "offsite_dropped", "retry_after_waits", "waf_cookie_acquired", "waf_cookie_reused",
            "photo_transactions", "spider_exceptions", "pipeline_exceptions",
            "catalogue_images_requested", "catalogue_images_stored", "catalogue_images_unchanged",
            "catalogue_images_rejected")},
        "failures": dict(sorted(failures.items())),
        "requests": ours.get("requests", 0),
        "retries": raw.get("retry/count", 0),
        "robots_forbidden": raw.get("robotstxt/forbidden", 0),
        "finish_reason": raw.get("finish_reason"),
        "elapsed_s": round(elapsed, 3),
        "image_phase_s": round(last - first, 3) if first and last and last > first else None,
        # Wall-clock bounds (Unix seconds) of that phase: when crawls overlap, so do these.
        "image_phase_from": round(first, 3) if first else None,
        "image_phase_to": round(last, 3) if last else None,
        "error": getattr(spider, "fatal_error", None),
    }
    fatal = stats["error"] is not None
    if stats["error"] is None:
        stats["error"] = crawl_problem(stats)
    if not fatal:  # the manifest is reachable: its run row shows this category's numbers
        manifest_writer.merge_category_stats(settings.manifest_url, run_id, category_id, stats)
    return stats


def crawl_problem(stats: dict) -> str | None:
    """Why a category crawl that ran to its end still failed the night, or None.

    A category that yields no product (its ranking lost to an error or an empty answer) and a
    crawl in which a callback or the item pipeline raised (a bug, or an answer the site adapter
    did not foresee) are failures: the run must not look finished.
    """
    if stats.get("finish_reason") != "finished":
        return f"crawl ended early: {stats.get('finish_reason')}"
    for where, reason in (("spider", "spider_exception"),
                          ("item pipeline", "pipeline_exception")):
        if stats.get(f"{reason}s"):
            return (f"{stats[f'{reason}s']} unexpected exception(s) in the {where}, recorded "
                    f"in crawl_failures with reason {reason}")
    if not stats.get("products"):
        failed = ", ".join(f"{k} x{v}" for k, v in stats.get("failures", {}).items()) or "none"
        return (f"category {stats.get('category_id')}: no product crawled (its ranking was lost "
                f"or empty; failures recorded: {failed})")
    return None

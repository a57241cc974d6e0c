"""End to end on a real Airflow: api-server, scheduler, dag-processor, triggerer and Celery workers
on Redis, PostgreSQL for metadata and manifest, SeaweedFS for objects, the replica shop for the web.

The nightly DAG is triggered over the REST API exactly as a data engineer's script would.
"""
from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from shoplens.store import ObjectStore
from tests.airflow_e2e import drop_database, expected_photo_reviews, manifest_snapshot, stack_for
from tests.conftest import shared_path

pytestmark = pytest.mark.e2e

CATEGORIES = ["10120000", "16220000"]
BEST_N = 3


@pytest.fixture
def replica(small_replica):
    return small_replica


@pytest.fixture
def crawl_settings(replica_settings):
    return replica_settings


def _stored_review_ids(manifest_url: str) -> set[int]:
    eng = sa.create_engine(manifest_url)
    with eng.connect() as conn:
        ids = {r for (r,) in conn.execute(sa.text("SELECT review_id FROM review_photos"))}
    eng.dispose()
    return ids


def _run_stack(tmp_path, settings, workers):
    model = shared_path("models", "yolox_nano.onnx")  # the filter stage needs the detector
    stack = stack_for(tmp_path / "airflow", settings, model)
    try:
        stack.start(workers=workers)
    except Exception:
        stack.stop()
        drop_database(stack.db_url)
        raise
    return stack


def test_nightly_dag_triggered_over_rest_crawls_exactly_the_shop(tmp_path, crawl_settings, replica):
    stack = _run_stack(tmp_path, crawl_settings, {"worker-1": "default,training"})
    try:
        run_id = stack.trigger("shoplens_nightly", {"categories": CATEGORIES, "best_n": BEST_N})
        state = stack.wait_for_run("shoplens_nightly", run_id, timeout=600)
        assert state == "success", stack.logs_tail()
    finally:
        stack.stop()
        drop_database(stack.db_url)

    truth = replica.ground_truth()
    assert _stored_review_ids(crawl_settings.manifest_url) == expected_photo_reviews(truth, CATEGORIES, BEST_N)
    served = {sha for shas in truth["served"].values() for sha in shas}
    store = ObjectStore(crawl_settings)
    keys = set(store.list_keys("images/"))
    eng = sa.create_engine(crawl_settings.manifest_url)
    with eng.connect() as conn:
        rows = conn.execute(sa.text("SELECT sha256, object_key FROM images")).all()
        catalogue = conn.execute(sa.text("SELECT object_key FROM catalogue_images")).scalars().all()
        # The filter's salvage stores crops of multi-product photos beside them (images/<sha256>).
        crops = conn.execute(sa.text("SELECT object_key FROM salvaged_crops "
                                     "WHERE object_key IS NOT NULL")).scalars().all()
    eng.dispose()
    assert {key for _, key in rows} | set(catalogue) | set(crops) == keys, \
        "every object has a row and every row an object"
    assert {sha for sha, _ in rows} <= served, "stored bytes are exactly bytes the shop served"
    # Two categories crawled in parallel still share one per-host budget.
    for host, seen in replica.stats()["hosts"].items():
        assert seen["max_in_flight"] <= crawl_settings.concurrent_per_host, host


def test_two_workers_one_killed_mid_run_still_succeed_with_the_same_manifest(
        tmp_path, crawl_settings, replica, other_database):
    # Slow the crawl a little so that the kill lands while crawl tasks are running.
    settings = crawl_settings.with_overrides(download_delay=0.05, concurrent_per_host=2)
    stack = _run_stack(tmp_path, settings, {"worker-a": "default,training", "worker-b": "default,training"})
    try:
        run_id = stack.trigger("shoplens_nightly", {"categories": CATEGORIES, "best_n": BEST_N})
        victim = _wait_for_running_crawl(stack, run_id)
        stack.kill(victim)
        state = stack.wait_for_run("shoplens_nightly", run_id, timeout=900)
        assert state == "success", stack.logs_tail()
        tries = [ti["try_number"] for ti in stack.task_instances("shoplens_nightly", run_id)
                 if ti["task_id"] == "crawl_categories"]
        assert max(tries) >= 2, "the killed worker's crawl was retried elsewhere"
    finally:
        stack.stop()
        drop_database(stack.db_url)

    # The same crawl, undisturbed and without Airflow, into a second manifest.
    from shoplens.manifest import upgrade
    from crawler import crawl_category, finish_run, start_run

    undisturbed = settings.with_overrides(manifest_url=other_database, categories=CATEGORIES, best_n=BEST_N)
    upgrade(other_database)
    start_run(undisturbed, "undisturbed")
    for category in CATEGORIES:
        crawl_category(undisturbed, category, "undisturbed")
    finish_run(undisturbed, "undisturbed")
    assert manifest_snapshot(settings.manifest_url) == manifest_snapshot(other_database)


def _wait_for_running_crawl(stack, run_id: str, timeout: float = 300) -> str:
    """Name of the worker whose process tree runs a crawl task right now."""
    import psutil

    workers = {pid: name for name, pid in stack.pids.items() if name.startswith("worker-")}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ti in stack.task_instances("shoplens_nightly", run_id):
            if ti["task_id"] == "crawl_categories" and ti["state"] == "running" and ti.get("pid"):
                try:
                    ancestors = {p.pid for p in psutil.Process(ti["pid"]).parents()}
                except psutil.NoSuchProcess:
                    continue
                for pid in ancestors & set(workers):
                    return workers[pid]
        time.sleep(0.3)
    raise TimeoutError("no crawl task started running")

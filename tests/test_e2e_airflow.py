"""End to end on a real Airflow: one nightly run, triggered over the REST API exactly as a data
engineer's script would, on two Celery workers, survives a worker killed mid-crawl and one killed
mid-batch, and ends exactly as an undisturbed run.

The stack (api-server, scheduler, dag-processor, triggerer, two Celery workers of one task slot each
on Redis; PostgreSQL for metadata and manifest, SeaweedFS for objects, the replica shop for the web)
starts once for the whole scenario: it is most of the test's time. The DAG runs with batches of a
few photos, so dedup hashing and filter detection are each several mapped tasks.

1. While the crawl runs (slowed a little), the worker running one crawl task is killed (SIGKILL,
   its whole process tree: worker, task supervisor, task) and started again, as a machine that
   reboots. Airflow notices the dead task by its missing heartbeats and retries that crawl. (A
   kill that came after the crawl ended fails the test: the killed try must not have succeeded.)
2. The test makes the later timing deterministic through the manifest itself: it holds a SHARE
   lock on ``image_hashes`` and on ``detections``, so every batch does its work and then waits at
   its one write transaction. When both workers wait in a dedup batch, the dedup lock is let go;
   when both wait in a filter batch, one worker is killed and then the filter lock is let go. The
   killed batch is retried on the other worker.

The run must crawl exactly the best-N products' photos (politely, stored only as the shop served
them), and its manifest must equal, table by table, one undisturbed in-process run of the same
stages over the same shop: a batch or a crawl lost with its worker leaves rows missing there.
"""
from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.request import quote

import pytest
import sqlalchemy as sa

from shoplens.dev.airflow_stack import worker_hostname
from shoplens.store import ObjectStore
from tests.airflow_e2e import drop_database, expected_photo_reviews, manifest_snapshot, stack_for
from tests.conftest import shared_path

pytestmark = pytest.mark.e2e

DAG = "shoplens_nightly"
CATEGORIES = ["10120000", "16220000"]
BEST_N = 3
BATCH = 8  # photos per mapped batch: the replica's ~25 photos make 3-4 batches per stage
WORKERS = ("worker-a", "worker-b")

# What the stages decide, without run ids and timestamps: equal for equal work.
MANIFEST_QUERIES = {
    "images": "SELECT sha256, object_key, width, height, format FROM images",
    "image_hashes": "SELECT sha256, phash, dhash, hash_version FROM image_hashes",
    "image_dedup": "SELECT sha256, cluster_id, duplicate_of, distance, threshold, spans_products"
                   " FROM image_dedup",
    "detections": "SELECT sha256, detector_version, features_version, width, height, boxes, stats,"
                  " min_score FROM detections",
    "rule_decisions": "SELECT sha256, rule, passed, score, reason, rule_version, detector_version,"
                      " params FROM rule_decisions",
    "label_map": "SELECT label, product_id FROM label_map",
    "dataset_versions": "SELECT version_id, status, content_hash, counts, excluded_products"
                        " FROM dataset_versions",
    "dataset_members": "SELECT version_id, sha256, label, product_id, split, cluster_id, object_key,"
                       " product_name, category_id, review_id, source_url, width, height, format"
                       " FROM dataset_members",
}


def manifest_dump(url: str) -> dict[str, list[tuple]]:
    """Each table of :data:`MANIFEST_QUERIES` as sorted rows (JSON values as canonical text)."""
    def canonical(value):
        return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value

    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            return {name: sorted((tuple(canonical(v) for v in row) for row in conn.execute(sa.text(q))),
                                 key=repr)
                    for name, q in MANIFEST_QUERIES.items()}
    finally:
        eng.dispose()


class WriteGate:
    """A SHARE lock on one manifest table, held in an open transaction: readers pass, every
    writer waits at its write until :meth:`open`."""

    def __init__(self, url: str, table: str):
        self.table = table
        self.engine = sa.create_engine(url)
        self.conn = self.engine.connect()
        self.tx = self.conn.begin()
        self.conn.execute(sa.text(f"LOCK TABLE {table} IN SHARE MODE"))

    def writers_waiting(self) -> int:
        with self.engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation"
                " WHERE l.locktype = 'relation' AND NOT l.granted AND c.relname = :t"
                " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"),
                {"t": self.table}).scalar_one()

    def open(self) -> None:
        if self.tx.is_active:
            self.tx.commit()
        self.conn.close()
        self.engine.dispose()


def wait_for_batches_at_write(stack, run_id: str, task_id: str, gate: WriteGate,
                              timeout: float = 300) -> dict[int, str]:
    """map_index -> hostname of the running ``task_id`` batches, once one runs on every worker
    and each waits at its write behind ``gate``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = {ti["map_index"]: ti["hostname"] for ti in stack.task_instances(DAG, run_id)
                   if ti["task_id"] == task_id and ti["state"] == "running" and ti.get("hostname")}
        if len(set(running.values())) == len(WORKERS) and gate.writers_waiting() >= len(WORKERS):
            return running
        if stack.run_state(DAG, run_id) in ("success", "failed"):
            break
        time.sleep(0.5)
    raise TimeoutError(f"no {task_id} batch waiting on each worker\n{stack.logs_tail()}")


def wait_for_running_crawl(stack, run_id: str, timeout: float = 300) -> tuple[int, str]:
    """(map_index, worker name) of a crawl task running right now, its worker found as the
    ancestor of the task's process."""
    import psutil

    workers = {pid: name for name, pid in stack.pids.items() if name in WORKERS}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for ti in stack.task_instances(DAG, run_id):
            if ti["task_id"] == "crawl_categories" and ti["state"] == "running" and ti.get("pid"):
                try:
                    ancestors = {p.pid for p in psutil.Process(ti["pid"]).parents()}
                except psutil.NoSuchProcess:
                    continue
                for pid in ancestors & set(workers):
                    return ti["map_index"], workers[pid]
        time.sleep(0.3)
    raise TimeoutError(f"no crawl task started running\n{stack.logs_tail()}")


def tries(stack, run_id: str, task_id: str) -> list[dict]:
    """Every try of every mapped ``task_id`` instance (map_index, try_number, hostname, state)."""
    out = []
    for ti in stack.task_instances(DAG, run_id):
        if ti["task_id"] != task_id:
            continue
        path = f"/dags/{DAG}/dagRuns/{quote(run_id)}/taskInstances/{ti['task_id']}/{ti['map_index']}/tries"
        out += stack.api("GET", path)["task_instances"]
    return out


def log_text(stack, run_id: str, task_id: str, map_index: int, try_number: int) -> str:
    path = (f"/dags/{DAG}/dagRuns/{quote(run_id)}/taskInstances/{task_id}/logs/{try_number}"
            f"?map_index={map_index}&full_content=true")
    content = stack.api("GET", path)["content"]
    return "\n".join(e if isinstance(e, str) else str(e.get("event", "")) for e in content)


def undisturbed_run(settings, manifest_url: str, model) -> None:
    """The same shop crawled and staged in this process into ``manifest_url`` and a bucket of its
    own: default batch size (one batch a stage), one process, nothing killed."""
    from crawler import crawl_category, finish_run, start_run
    from dataset.build import stage as build
    from dataset.dedup import stage as dedup
    from dataset.filter import stage as filter_stage
    from shoplens.manifest import upgrade

    reference = settings.with_overrides(
        manifest_url=manifest_url, s3_bucket=f"t-{uuid.uuid4().hex[:12]}", categories=CATEGORIES,
        best_n=BEST_N, detector_model_path=str(model), detector_threads=1,
        dataset_min_photos_per_product=1)
    ObjectStore(reference).ensure_bucket()
    upgrade(manifest_url)
    start_run(reference, "reference")
    for category in CATEGORIES:
        crawl_category(reference, category, "reference")
    finish_run(reference, "reference")
    dedup.run(reference, "reference")
    filter_stage.run(reference, "reference")
    build.run(reference, "reference")


def stored_review_ids(manifest_url: str) -> set[int]:
    eng = sa.create_engine(manifest_url)
    try:
        with eng.connect() as conn:
            return {r for (r,) in conn.execute(sa.text("SELECT review_id FROM review_photos"))}
    finally:
        eng.dispose()


def test_nightly_run_crawls_exactly_the_shop_and_loses_nothing_to_workers_killed_mid_crawl_and_mid_batch(
        tmp_path, small_replica, replica_settings, other_database):
    model = shared_path("models", "yolox_nano.onnx")  # the filter stage needs the detector
    # A slower crawl (per-host budget 2, shared by the two crawl processes) so that the first kill
    # lands while crawl tasks run.
    settings = replica_settings.with_overrides(download_delay=0.05, concurrent_per_host=2)
    stack = stack_for(tmp_path / "airflow", settings, model)
    stack.worker_concurrency = 1  # one task at a time per worker: a kill takes exactly one task
    stack.extra_env.update({"SHOPLENS_DEDUP_HASH_BATCH": str(BATCH),
                            "SHOPLENS_FILTER_DETECT_BATCH": str(BATCH),
                            "SHOPLENS_DETECTOR_THREADS": "1"})
    hosts = {w: worker_hostname(w) for w in WORKERS}
    gates = {"dedup_hash": WriteGate(settings.manifest_url, "image_hashes"),
             "filter_detect": WriteGate(settings.manifest_url, "detections")}
    # The reference run, in its own database and bucket, overlaps the stack's start (mostly waits).
    with ThreadPoolExecutor(1) as pool:
        reference = pool.submit(undisturbed_run, settings, other_database, model)
        try:
            stack.start(workers={w: "default,training" for w in WORKERS})
            # Done before the nightly run crawls: the shop's per-host counts are then each crawl's own.
            reference.result()
            run_id = stack.trigger(DAG, {"categories": CATEGORIES, "best_n": BEST_N})

            # A worker killed inside a crawl, then started again under the same name.
            killed_crawl, crawl_victim = wait_for_running_crawl(stack, run_id)
            stack.kill(crawl_victim)
            stack.start_worker(crawl_victim, "default,training")

            # Both workers in a dedup batch, waiting at its write: let them write.
            wait_for_batches_at_write(stack, run_id, "dedup_hash", gates["dedup_hash"], timeout=600)
            gates["dedup_hash"].open()

            # Both workers in a filter batch, waiting at its write: kill one, let the other write.
            waiting = wait_for_batches_at_write(stack, run_id, "filter_detect", gates["filter_detect"])
            killed_batch = min(waiting)
            victim = next(w for w, h in hosts.items() if h == waiting[killed_batch])
            survivor = next(w for w in WORKERS if w != victim)
            stack.kill(victim)
            gates["filter_detect"].open()

            state = stack.wait_for_run(DAG, run_id, timeout=900)
            assert state == "success", stack.logs_tail()
            crawl_tries = tries(stack, run_id, "crawl_categories")
            dedup_tries = tries(stack, run_id, "dedup_hash")
            filter_tries = tries(stack, run_id, "filter_detect")
            logs = {(t["task_id"], t["map_index"], t["try_number"]):
                    log_text(stack, run_id, t["task_id"], t["map_index"], t["try_number"])
                    for t in dedup_tries + filter_tries if t["state"] == "success"}
        finally:
            for gate in gates.values():
                gate.open()
            stack.stop()
            drop_database(stack.db_url)
        reference.result()

    # (a) The killed crawl was retried, and its retry succeeded.
    killed = sorted((t for t in crawl_tries if t["map_index"] == killed_crawl),
                    key=lambda t: t["try_number"])
    assert killed[0]["hostname"] == hosts[crawl_victim] and killed[0]["state"] != "success"
    assert killed[-1]["state"] == "success"

    # (b) The mapped batches ran on both workers, and each batch's log shows its progress line.
    assert len({t["map_index"] for t in dedup_tries}) >= 3
    assert {t["hostname"] for t in dedup_tries if t["state"] == "success"} == set(hosts.values())
    assert {t["hostname"] for t in filter_tries} == set(hosts.values())
    for (task_id, map_index, _), text in logs.items():
        stage = "dedup" if task_id == "dedup_hash" else "filter"
        assert f"{stage} batch {map_index + 1}/" in text, (task_id, map_index, text[-2000:])
    # The killed batch was taken over by the surviving worker: its last try succeeded there.
    killed = sorted((t for t in filter_tries if t["map_index"] == killed_batch),
                    key=lambda t: t["try_number"])
    assert killed[0]["hostname"] == hosts[victim] and killed[0]["state"] != "success"
    assert killed[-1]["hostname"] == hosts[survivor] and killed[-1]["state"] == "success"

    # (c) The run crawled exactly the shop: the best-N products' photo reviews, only bytes the shop
    # served, one row for every stored object and an object for every row, within the per-host budget.
    truth = small_replica.ground_truth()
    assert stored_review_ids(settings.manifest_url) == expected_photo_reviews(truth, CATEGORIES, BEST_N)
    served = {sha for shas in truth["served"].values() for sha in shas}
    keys = set(ObjectStore(settings).list_keys("images/"))
    eng = sa.create_engine(settings.manifest_url)
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
    # Two categories crawled in parallel (and a crawl retried) still share one per-host budget.
    for host, seen in small_replica.stats()["hosts"].items():
        assert seen["max_in_flight"] <= settings.concurrent_per_host, host

    # (d) The run succeeded (above), and its manifest is the undisturbed run's, crawl and stages.
    assert manifest_snapshot(settings.manifest_url) == manifest_snapshot(other_database)
    after_kills, undisturbed = manifest_dump(settings.manifest_url), manifest_dump(other_database)
    assert undisturbed["dataset_members"], "the reference built a dataset version"
    for table in MANIFEST_QUERIES:
        assert after_kills[table] == undisturbed[table], table

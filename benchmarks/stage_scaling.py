"""Issue 15 "Filter and dedup": the batched stages against their bare compute, and 2 workers vs 1.

    nice -n 10 .venv/bin/python benchmarks/stage_scaling.py [--photos 1000] [--rounds 2]
        [--ratio-photos 300] [--ratio-rounds 3] [--batch 100] [--out results/stage_scaling.json]

Setup: a fresh manifest database on the local PostgreSQL and a private SeaweedFS; ``--photos``
replica photos (``crawler.replica.synthetic.render_photo``: one rendered photo per 5 photos, the
other 4 its re-encodes at other JPEG qualities with a few pixels cropped, i.e. the reposts and
near-duplicates dedup exists for; cached under the replica's cache folder) stored as a crawl would
(objects + ``images`` rows).

(a) **stage over bare compute, one worker** (first ``--ratio-photos`` photos): the stage is
``plan_batches`` + every batch in one process (object-store GETs 8 in flight ahead of the
compute, one upsert transaction per batch); the bare compute is the stage's own per-photo
function on bytes already in memory (``hashes_of_bytes``: decode + hash; ``features_for``:
decode + detect + image statistics), one photo after the other. Both sides in the same process,
one onnxruntime session with 1 intra-op thread; which side goes first alternates per round. The
ratio is (stage photos/s) / (bare photos/s), median over rounds. Since photos/s moves with the
load other jobs put on the shared machine, the process CPU seconds of each side (all threads)
are also reported: bare CPU / stage CPU (the worker's own overhead: GETs, manifest, threads),
and the same with SeaweedFS's CPU during the stage side added (as when the store shares the
worker's cores).

(b) **2 workers vs 1** on the whole backlog: N worker processes (as N Celery workers with one
slot each) take the planned batches from one queue; each loads its detector (1 intra-op thread)
before the clock starts. Timed: first batch taken to last batch written, dedup hashing and filter
detection separately; then the single decision step (clusters; rules) runs once in the parent.
Rounds alternate 1, 2, 2, 1, ... workers. After every round the hashes, detections, clusters and
rule decisions are compared with the first round's: they must be identical.

(c) **intra-op threads**: YOLOX-Nano's graph has a fixed batch of 1, so there is no batched
inference to try; instead ``session.run`` with 2 intra-op threads vs 1 on this machine says
whether one worker's onnxruntime already uses both cores.

The machine is shared: the load average is recorded around every measurement.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import random
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from benchmarks.procstat import cpu_seconds, machine_busy_seconds  # noqa: E402
from shoplens.dev.services import SeaweedFS  # noqa: E402

STORE_PID: list[int] = []  # the SeaweedFS process, for its CPU seconds

PG_SERVER = os.environ.get("SHOPLENS_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
VARIANTS = 5  # photos per rendered photo


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# Photos and the manifest
# --------------------------------------------------------------------------------------------
def replica_photos(count: int) -> list[bytes]:
    """``count`` distinct JPEGs: renders of the replica's generator and their re-encodes."""
    from PIL import Image

    from crawler.replica.synthetic import default_cache_dir, product_looks, render_photo

    renders = -(-count // VARIANTS)
    folder = default_cache_dir() / f"stage-scaling-v1-r{renders}"
    folder.mkdir(parents=True, exist_ok=True)
    looks = product_looks(15, 60)
    photos = []
    for r in range(renders):
        path = folder / f"{r:05d}.jpg"
        if not path.exists():
            rng = random.Random(f"stage-scaling:{r}")
            image = render_photo(looks[r % len(looks)], rng)
            tmp = path.with_suffix(".tmp")
            image.save(tmp, "JPEG", quality=90)
            tmp.rename(path)
        original = path.read_bytes()
        photos.append(original)
        image = Image.open(io.BytesIO(original)).convert("RGB")
        for v in range(1, VARIANTS):
            out = io.BytesIO()
            image.crop((v, v, image.width - v, image.height - v)).save(out, "JPEG",
                                                                       quality=90 - 6 * v)
            photos.append(out.getvalue())
    return photos[:count]


def seed_manifest(settings, photos: list[bytes]) -> None:
    """Crawl rows and stored objects for the photos (the crawler's shape, written directly)."""
    import hashlib

    from PIL import Image

    from shoplens.manifest import engine_for
    from shoplens.store import ObjectStore

    store = ObjectStore(settings)
    store.ensure_bucket()
    rows = []
    from concurrent.futures import ThreadPoolExecutor

    def put(data: bytes) -> tuple[str, str]:
        sha = hashlib.sha256(data).hexdigest()
        key, _ = store.put_image(data, "jpeg", sha)
        return sha, key

    with ThreadPoolExecutor(8) as pool:
        stored = list(pool.map(put, photos))
    with engine_for(settings.manifest_url).begin() as conn:
        run = conn.execute(sa.text("INSERT INTO crawl_runs (run_key, shop_base_url) "
                                   "VALUES ('crawl', 'http://replica') RETURNING id")).scalar_one()
        conn.execute(sa.text("INSERT INTO categories (id, name, first_seen_run, last_seen_run) "
                             "VALUES ('10120000', 'beds', :r, :r)"), {"r": run})
        for p in range(1, 61):
            conn.execute(sa.text(
                "INSERT INTO products (id, category_id, name, source_url, first_seen_run, "
                "last_seen_run) VALUES (:p, '10120000', :n, :u, :r, :r)"),
                {"p": p, "n": f"product {p}", "u": f"http://replica/p/{p}", "r": run})
        for k, ((sha, key), data) in enumerate(zip(stored, photos)):
            width, height = Image.open(io.BytesIO(data)).size
            product = 1 + (k // VARIANTS) % 60
            conn.execute(sa.text("INSERT INTO reviews (id, product_id, source_url, first_seen_run) "
                                 "VALUES (:id, :p, 'http://replica/r', :r)"),
                         {"id": k + 1, "p": product, "r": run})
            rows.append({"s": sha, "k": key, "b": len(data), "w": width, "h": height,
                         "u": f"http://cdn/{sha}", "rv": k + 1, "p": product, "r": run})
        conn.execute(sa.text(
            "INSERT INTO images (sha256, object_key, size_bytes, width, height, format, source_url,"
            " review_id, product_id, first_seen_run) VALUES (:s, :k, :b, :w, :h, 'jpeg', :u, :rv,"
            " :p, :r)"), rows)


def reset(settings, stage: str) -> None:
    from shoplens.manifest import engine_for

    tables = {"dedup": ("image_dedup", "image_hashes"),
              "filter": ("salvaged_crops", "rule_decisions", "detections", "filter_runs")}[stage]
    with engine_for(settings.manifest_url).begin() as conn:
        for table in tables:
            conn.execute(sa.text(f"DELETE FROM {table}"))


def snapshot(settings) -> dict:
    """What must not depend on the worker count: hashes, clusters, detections, decisions."""
    from shoplens.manifest import engine_for

    queries = {
        "hashes": "SELECT sha256, phash, dhash, hash_version FROM image_hashes ORDER BY 1",
        "clusters": "SELECT sha256, cluster_id, duplicate_of, distance, spans_products "
                    "FROM image_dedup ORDER BY 1",
        "detections": "SELECT sha256, detector_version, width, height, boxes::text, stats::text "
                      "FROM detections ORDER BY 1",
        "decisions": "SELECT sha256, rule, passed, score, reason FROM rule_decisions ORDER BY 1, 2",
    }
    with engine_for(settings.manifest_url).connect() as conn:
        return {name: [tuple(r) for r in conn.execute(sa.text(q))] for name, q in queries.items()}


# --------------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------------
def worker(settings, stage: str, queue, results, ready, go) -> None:
    """One worker process: take batches until the queue is empty (as a Celery worker would)."""
    # Its own session, hence its own scheduler autogroup, as a separately started Celery worker
    # has: with autogroups on (this machine), every process of one session shares one CPU share,
    # so two workers of one session could never get more CPU than one.
    os.setsid()
    from dataset.dedup import stage as dedup
    from dataset.filter import stage as filter_stage

    detector = filter_stage.load_detector(settings) if stage == "filter" else None
    ready.wait()
    go.wait()
    cpu_started = time.process_time()
    while True:
        batch = queue.get()
        if batch is None:
            return
        if stage == "dedup":
            out = dedup.hash_batch(settings, batch)
        else:
            out = filter_stage.detect_batch(settings, batch, detector)
        results.put((os.getpid(), out, time.perf_counter(), time.process_time() - cpu_started))


def run_workers(settings, stage: str, n: int) -> dict:
    """Plan, let ``n`` worker processes take the batches, decide; seconds of the batches."""
    from dataset.dedup import stage as dedup
    from dataset.filter import stage as filter_stage

    module = dedup if stage == "dedup" else filter_stage
    reset(settings, stage)
    plan = module.plan_batches(settings, "night")
    ctx = mp.get_context("spawn")
    queue, results = ctx.Queue(), ctx.Queue()
    ready, go = ctx.Barrier(n + 1), ctx.Barrier(n + 1)
    for batch in plan:
        queue.put(batch.as_dict())
    for _ in range(n):
        queue.put(None)
    procs = [ctx.Process(target=worker, args=(settings, stage, queue, results, ready, go))
             for _ in range(n)]
    for p in procs:
        p.daemon = True  # a failing benchmark takes its workers with it
        p.start()
    ready.wait()  # every worker has imported and loaded its detector
    load_before = load()
    busy_before = machine_busy_seconds()
    store_before = cpu_seconds(f"/proc/{STORE_PID[0]}/stat")[0] if STORE_PID else 0.0
    started = time.perf_counter()
    go.wait()
    outs, by_worker, cpu, last = [], {}, {}, started
    for _ in plan:
        pid, out, finished, worker_cpu = results.get(timeout=3600)
        outs.append(out)
        by_worker[pid] = by_worker.get(pid, 0) + 1
        cpu[pid] = max(cpu.get(pid, 0.0), worker_cpu)
        last = max(last, finished)
    busy = machine_busy_seconds() - busy_before
    store_cpu = (cpu_seconds(f"/proc/{STORE_PID[0]}/stat")[0] - store_before) if STORE_PID else 0.0
    for p in procs:
        p.join()
    seconds = last - started
    photos = sum(o.get("hashed", o.get("inspected", 0)) for o in outs)
    decide_started = time.perf_counter()
    module.decide(settings, "night", outs)
    return {"workers": n, "stage": stage, "batches": len(plan), "photos": photos,
            "seconds": round(seconds, 2), "batches_per_worker": sorted(by_worker.values()),
            # CPU of the worker processes (their prefetch and onnxruntime threads included) per
            # photo, and the share of the machine's busy core-seconds they got in the window.
            "worker_cpu_ms_per_photo": round(1000 * sum(cpu.values()) / max(photos, 1), 2),
            "worker_cpu_s": sorted(round(c, 2) for c in cpu.values()),
            "machine_busy_core_s": round(busy, 2),
            # SeaweedFS serving the GETs (one process here), per photo.
            "object_store_cpu_ms_per_photo": round(1000 * store_cpu / max(photos, 1), 2),
            "decide_seconds": round(time.perf_counter() - decide_started, 2),
            "load_before": load_before, "load_after": load()}


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def stage_over_bare(settings, photos: list[bytes], rounds: int) -> dict:
    from dataset.dedup import stage as dedup
    from dataset.dedup.hashing import hashes_of_bytes
    from dataset.filter import stage as filter_stage
    from dataset.filter.stage import features_for
    from shoplens.photos import PhotoLimits

    limits = PhotoLimits.from_settings(settings)
    detector = filter_stage.load_detector(settings)
    bare = {"dedup": lambda data: hashes_of_bytes(data, limits=limits),
            "filter": lambda data: features_for(detector, data, limits=limits)}

    def store_cpu() -> float:
        return cpu_seconds(f"/proc/{STORE_PID[0]}/stat")[0] if STORE_PID else 0.0

    def stage_side(name: str) -> float:
        reset(settings, name)
        cpu[name]["stage_store"] -= store_cpu()
        cpu[name]["stage"] -= time.process_time()
        started = time.perf_counter()
        if name == "dedup":
            for batch in dedup.plan_batches(settings, "ratio"):
                dedup.hash_batch(settings, batch)
        else:
            for batch in filter_stage.plan_batches(settings, "ratio"):
                filter_stage.detect_batch(settings, batch, detector)
        seconds = time.perf_counter() - started
        cpu[name]["stage"] += time.process_time()
        cpu[name]["stage_store"] += store_cpu()
        return seconds

    def bare_side(name: str) -> float:
        cpu[name]["bare"] -= time.process_time()
        started = time.perf_counter()
        for data in photos:
            bare[name](data)
        seconds = time.perf_counter() - started
        cpu[name]["bare"] += time.process_time()
        return seconds

    for data in photos[:5]:  # warm-up: codecs, onnxruntime arenas
        bare["dedup"](data), bare["filter"](data)
    out = {}
    # Process CPU seconds of each side (all its threads), and SeaweedFS's during the stage side:
    # unlike photos/s, these hardly move with the load other jobs put on the machine.
    cpu = {name: {"stage": 0.0, "bare": 0.0, "stage_store": 0.0} for name in ("dedup", "filter")}
    for name in ("dedup", "filter"):
        runs = []
        for r in range(rounds):
            load_before = load()
            if r % 2:
                s = stage_side(name)
                b = bare_side(name)
            else:
                b = bare_side(name)
                s = stage_side(name)
            runs.append({"bare_s": round(b, 2), "stage_s": round(s, 2), "ratio": round(b / s, 3),
                         "load_before": load_before, "load_after": load()})
        ratios = [r["ratio"] for r in runs]
        out[name] = {"photos": len(photos), "ratio_stage_over_bare": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios),
                     "bare_photos_per_s": round(len(photos) / statistics.median(
                         r["bare_s"] for r in runs), 1),
                     "stage_photos_per_s": round(len(photos) / statistics.median(
                         r["stage_s"] for r in runs), 1),
                     "target": 0.85, "rounds": runs}
        photo_count = len(photos) * rounds
        ms = {k: 1000 * v / photo_count for k, v in cpu[name].items()}
        out[name] |= {
            "cpu_ms_per_photo": {"bare": round(ms["bare"], 3), "stage": round(ms["stage"], 3),
                                 "object_store_during_stage": round(ms["stage_store"], 3)},
            # bare CPU / stage process CPU: the worker's own overhead (the store runs elsewhere
            # in a deployment); and with the store's CPU added, as when it shares the cores.
            "cpu_ratio_stage_process": round(ms["bare"] / ms["stage"], 3),
            "cpu_ratio_with_object_store": round(ms["bare"] / (ms["stage"] + ms["stage_store"]), 3)}
    return out


def intra_op_threads(model: str, repeats: int = 3, runs: int = 40) -> dict:
    import numpy as np

    from shoplens.vision.detector import Detector

    tensor = np.random.default_rng(0).uniform(0, 255, (1, 3, 416, 416)).astype(np.float32)
    detectors = {t: Detector(model, threads=t) for t in (1, 2)}
    times = {1: [], 2: []}
    for r in range(repeats):
        for t in ((1, 2) if r % 2 == 0 else (2, 1)):
            detectors[t].infer(tensor)
            started = time.perf_counter()
            for _ in range(runs):
                detectors[t].infer(tensor)
            times[t].append((time.perf_counter() - started) / runs)
    one, two = statistics.median(times[1]), statistics.median(times[2])
    return {"session_run_ms_1_thread": round(one * 1000, 2),
            "session_run_ms_2_threads": round(two * 1000, 2),
            "speedup_2_threads_over_1": round(one / two, 3), "load": load()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of (1 worker, 2 workers)")
    ap.add_argument("--ratio-photos", type=int, default=300)
    ap.add_argument("--ratio-rounds", type=int, default=3, help="0: skip (a) and (c)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--stages", default="dedup,filter", help="comma-separated: the (b) rounds' stages")
    ap.add_argument("--store-go-procs", type=int, default=SeaweedFS.go_max_procs,
                    help="the store's Go scheduler threads (GOMAXPROCS; 0: one per core, Go's "
                         "default; the local stack runs %(default)s)")
    ap.add_argument("--shared", default=os.environ.get("SHOPLENS_SHARED_DIR", str(REPO.parent / "shared")))
    ap.add_argument("--out", default=str(REPO / "results" / "stage_scaling.json"))
    args = ap.parse_args(argv)
    model = Path(args.shared) / "models" / "yolox_nano.onnx"
    if not model.is_file():
        print(f"needs {model}", file=sys.stderr)
        return 2

    from shoplens.config import Settings
    from shoplens.manifest import engine_for, upgrade

    started = time.perf_counter()
    photos = replica_photos(args.photos)
    print(f"{len(photos)} photos ready in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    name = f"shoplens_bench_{uuid.uuid4().hex[:8]}"
    weed = SeaweedFS(Path(tempfile.mkdtemp(prefix="stage-scaling-")), 0,
                     "bench", "bench-secret-key", go_max_procs=args.store_go_procs)
    weed.start(timeout=300)  # a loaded shared machine can take minutes
    STORE_PID.append(weed.pid)
    admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        url = f"{PG_SERVER}/{name}"
        upgrade(url)
        base = Settings().with_overrides(
            manifest_url=url, s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
            s3_secret_key=weed.secret_key, s3_bucket="bench", detector_model_path=str(model),
            detector_threads=1, dedup_hash_batch=args.batch, filter_detect_batch=args.batch)
        seed_manifest(base, photos)
        print(f"manifest seeded in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        result: dict = {
            "command": "benchmarks/stage_scaling.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "cpus": os.cpu_count(), "photos": len(photos), "batch": args.batch,
            "store_go_procs": args.store_go_procs,
            "load_at_start": load(),
        }
        if args.ratio_rounds:  # (a) and (c); 0 measures (b) only
            result["intra_op_threads"] = intra_op_threads(str(model))
            print(json.dumps(result["intra_op_threads"]), file=sys.stderr)
            # (a) on a second manifest and bucket holding the first --ratio-photos photos.
            ratio_url = f"{PG_SERVER}/{name}_ratio"
            upgrade(ratio_url)
            ratio_settings = base.with_overrides(manifest_url=ratio_url, s3_bucket="bench-ratio")
            subset = photos[:args.ratio_photos]
            seed_manifest(ratio_settings, subset)
            result["stage_over_bare"] = stage_over_bare(ratio_settings, subset, args.ratio_rounds)
            print(json.dumps({k: {f: v[f] for f in ("ratio_stage_over_bare", "cpu_ratio_stage_process",
                                                    "cpu_ratio_with_object_store", "cpu_ms_per_photo")}
                              for k, v in result["stage_over_bare"].items()}), file=sys.stderr)
            engine_for(ratio_url).dispose()

        # (b) 1 vs 2 workers, alternating.
        order = [1, 2, 2, 1] * (args.rounds // 2 + 1)
        order = order[:2 * args.rounds]
        runs, first_snapshot, identical = [], None, True
        stages = [stage for stage in ("dedup", "filter") if stage in args.stages.split(",")]
        for n in order:
            for stage in stages:
                runs.append(run_workers(base, stage, n))
                print(json.dumps(runs[-1]), file=sys.stderr)
            shot = snapshot(base)
            if first_snapshot is None:
                first_snapshot = shot
            identical = identical and shot == first_snapshot
        scaling = {}
        for stage in stages if runs else ():  # --rounds 0: the ratio (a) only
            mine = [r for r in runs if r["stage"] == stage]
            # Rounds run in pairs (1, 2), (2, 1), ...: each pair's ratio compares runs minutes
            # apart, under about the same load from others; the median is over pairs.
            paired = [a["seconds"] / b["seconds"] if a["workers"] == 1 else b["seconds"] / a["seconds"]
                      for a, b in zip(mine[0::2], mine[1::2])]
            one = [r for r in mine if r["workers"] == 1]
            two = [r for r in mine if r["workers"] == 2]
            scaling[stage] = {
                "speedup_2_over_1_paired_median": round(statistics.median(paired), 3),
                "speedup_per_pair": [round(x, 3) for x in paired],
                "seconds_1_worker": [r["seconds"] for r in one],
                "seconds_2_workers": [r["seconds"] for r in two],
                "worker_cpu_ms_per_photo_1_worker": statistics.median(
                    r["worker_cpu_ms_per_photo"] for r in one),
                "worker_cpu_ms_per_photo_2_workers": statistics.median(
                    r["worker_cpu_ms_per_photo"] for r in two),
                "object_store_cpu_ms_per_photo": statistics.median(
                    r["object_store_cpu_ms_per_photo"] for r in mine),
                "target": 1.7}
        result["workers"] = {"order": order, "scaling": scaling, "identical_rows": identical,
                             "rows_compared": {k: len(v) for k, v in (first_snapshot or {}).items()},
                             "runs": runs}
        result["load_at_end"] = load()
        result["seconds_total"] = round(time.perf_counter() - started, 1)
    finally:
        from shoplens.manifest.db import engine_for as cached

        cached.cache_clear()
        with admin.connect() as conn:
            for db in (name, f"{name}_ratio"):
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        weed.stop()
        shutil.rmtree(weed.data_dir, ignore_errors=True)  # the store's files
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "workers"} | {
        "workers": {k: v for k, v in result["workers"].items() if k != "runs"}}, indent=2))
    return 0 if result["workers"]["identical_rows"] else 1  # vacuously identical without rounds


if __name__ == "__main__":
    raise SystemExit(main())

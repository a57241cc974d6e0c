"""Where the dedup / filter stage's CPU goes beyond its bare compute (a profiling aid, issue 15).

    PYTHONPATH=. N=300 ROUNDS=3 [PROFILE=dedup|filter] nice -n 10 .venv/bin/python benchmarks/stage_cpu.py

CPU seconds, not wall time, so the numbers hold on a loaded shared machine: per photo, the
stage process (all threads) and its main thread, the bare compute (decode + hash, decode +
detect), SeaweedFS and the PostgreSQL backends of the manifest database; plus one GET through
the minio client (``get_bytes``) single-threaded. ``PROFILE`` adds a cProfile of the stage's
main thread (thread CPU as the timer). Writes ``results/stage_cpu.json``; the setup is
``stage_scaling.py``'s (replica photos, fresh database, private SeaweedFS).
"""
import cProfile, pstats, os, sys, time, tempfile, uuid, json
from pathlib import Path
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import sqlalchemy as sa
from benchmarks import stage_scaling as ss
from benchmarks.procstat import cpu_seconds

N = int(os.environ.get("N", "300"))
PROFILE = os.environ.get("PROFILE", "")
from shoplens.config import Settings
from shoplens.dev.services import SeaweedFS
from shoplens.manifest import upgrade

def pg_cpu(url):
    eng = sa.create_engine(f"{ss.PG_SERVER}/postgres")
    with eng.connect() as c:
        pids = [r[0] for r in c.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE datname=:d"), {"d": url.rsplit('/',1)[1]})]
    eng.dispose()
    return sum((cpu_seconds(f"/proc/{p}/stat") or (0,0))[0] for p in pids)

def main():
    photos = ss.replica_photos(N)
    name = f"shoplens_prof_{uuid.uuid4().hex[:8]}"
    model = Path(os.environ.get("SHOPLENS_SHARED_DIR", "/work/shared")) / "models" / "yolox_nano.onnx"
    weed = SeaweedFS(Path(tempfile.mkdtemp(prefix="prof-")), 0, "bench", "bench-secret-key")
    weed.start()
    admin = sa.create_engine(f"{ss.PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        url = f"{ss.PG_SERVER}/{name}"; upgrade(url)
        s = Settings().with_overrides(manifest_url=url, s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
            s3_secret_key=weed.secret_key, s3_bucket="bench", detector_model_path=str(model),
            detector_threads=1, dedup_hash_batch=200, filter_detect_batch=200)
        ss.seed_manifest(s, photos)
        from dataset.dedup import stage as dedup
        from dataset.dedup.hashing import hashes_of_bytes
        from dataset.filter import stage as fs
        from shoplens.photos import PhotoLimits
        from shoplens.store import ObjectStore
        limits = PhotoLimits.from_settings(s)
        det = fs.load_detector(s)
        bare = {"dedup": lambda d: hashes_of_bytes(d, limits=limits), "filter": lambda d: fs.features_for(det, d, limits=limits)}
        for d in photos[:5]: bare["dedup"](d); bare["filter"](d)
        def stage_run(stg):
            ss.reset(s, stg)
            if stg == "dedup":
                for b in dedup.plan_batches(s, "r"): dedup.hash_batch(s, b)
            else:
                for b in fs.plan_batches(s, "r"): fs.detect_batch(s, b, det)
        stage_run("dedup"); stage_run("filter")  # warm pools
        out = {}
        # GET alone, single thread
        store = ObjectStore(s)
        with sa.create_engine(url).connect() as c:
            keys = [r[0] for r in c.execute(sa.text("SELECT object_key FROM images"))]
        w0 = cpu_seconds(f"/proc/{weed.pid}/stat")[0]; c0 = time.process_time(); t0 = time.perf_counter()
        for k in keys: store.get_bytes(k)
        out["get_client_cpu_ms"] = 1000*(time.process_time()-c0)/N
        out["get_store_cpu_ms"] = 1000*(cpu_seconds(f"/proc/{weed.pid}/stat")[0]-w0)/N
        out["get_wall_ms"] = 1000*(time.perf_counter()-t0)/N
        for stg in ("dedup", "filter"):
            for r in range(int(os.environ.get("ROUNDS", "2"))):
                c0 = time.process_time(); t0 = time.perf_counter()
                for d in photos: bare[stg](d)
                bc, bw = time.process_time()-c0, time.perf_counter()-t0
                p0 = pg_cpu(url); w0 = cpu_seconds(f"/proc/{weed.pid}/stat")[0]
                prof = cProfile.Profile(time.thread_time) if PROFILE == stg else None
                c0 = time.process_time(); t0 = time.perf_counter(); m0 = time.thread_time()
                if prof: prof.enable()
                stage_run(stg)
                if prof: prof.disable()
                sc, sw = time.process_time()-c0, time.perf_counter()-t0; mc = time.thread_time()-m0
                wc = cpu_seconds(f"/proc/{weed.pid}/stat")[0]-w0; pc = pg_cpu(url)-p0
                row = {"main_thread_cpu_ms": 1000*mc/N, "bare_cpu_ms": 1000*bc/N, "stage_cpu_ms": 1000*sc/N, "store_cpu_ms": 1000*wc/N, "pg_cpu_ms": 1000*pc/N,
                       "bare_wall_ms": 1000*bw/N, "stage_wall_ms": 1000*sw/N, "wall_ratio": bw/sw,
                       "cpu_ratio_proc": bc/sc, "cpu_ratio_all": bc/(sc+wc+pc), "load": os.getloadavg()[0]}
                out.setdefault(stg, []).append({k: round(v, 3) for k, v in row.items()})
                if prof:
                    pstats.Stats(prof).sort_stats("tottime").print_stats(30)
        (REPO / "results").mkdir(exist_ok=True)
        (REPO / "results" / "stage_cpu.json").write_text(json.dumps(out, indent=1))
        print(json.dumps(out, indent=1))
    finally:
        from shoplens.manifest.db import engine_for as cached
        cached.cache_clear()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        weed.stop()
main()

"""CPU per object-store GET of the three read paths (issue 15's per-photo stages read through the
pipelined one), against a private SeaweedFS, and the store's own CPU per GET by its Go scheduler
threads:

    .venv/bin/python benchmarks/store_get.py [--objects 200 --repeats 5 --store-objects 600 --store-repeats 10]

``get_bytes`` (the minio client), ``read_object`` one at a time, and ``read_objects`` (8 requests
pipelined on one connection), alternating rounds in one process; thread CPU and wall ms per GET.
Then two SeaweedFS processes side by side, Go's default scheduler threads (one per core) and one
(``SeaweedFS.go_max_procs``, what the local stack runs), each serving the same pipelined reads in
alternating rounds: the store process's CPU ms per GET (user + system from /proc). Writes
``results/store_get.json``.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.procstat import cpu_seconds  # noqa: E402
from shoplens.config import Settings  # noqa: E402
from shoplens.dev.services import SeaweedFS  # noqa: E402
from shoplens.store import ObjectStore  # noqa: E402


def process_cpu_s(pid: int) -> float:
    return cpu_seconds(f"/proc/{pid}/stat")[0]


def filled_store(weed: SeaweedFS, objects: int, size: int) -> tuple[ObjectStore, list[str]]:
    settings = Settings().with_overrides(s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
                                         s3_secret_key=weed.secret_key, s3_bucket="bench")
    store = ObjectStore(settings)
    store.ensure_bucket()
    keys = [f"images/{i:05d}" for i in range(objects)]
    for key in keys:  # distinct objects, as photos are
        store.put_bytes(key, os.urandom(size), "image/jpeg")
    return store, keys


def store_cpu_by_go_threads(objects: int, size: int, repeats: int) -> dict:
    """The store process's CPU ms per pipelined GET, Go's default threads vs one."""
    setups = {"go default (one thread per core)": 0, "GOMAXPROCS=1": 1}
    stores, samples = {}, {name: [] for name in setups}
    try:
        for name, procs in setups.items():
            weed = SeaweedFS(Path(tempfile.mkdtemp(prefix="store-cpu-")), 0, "bench",
                             "bench-secret-key", go_max_procs=procs)
            stores[name] = (weed.start(), *filled_store(weed, objects, size))
        for name, (weed, store, keys) in stores.items():  # warm-up; every GET answers
            assert all(error is None for _, _, error in store.read_objects(keys))
        for r in range(repeats):
            for name in (list(setups) if r % 2 == 0 else list(setups)[::-1]):
                weed, store, keys = stores[name]
                time.sleep(0.5)  # the store's background work between rounds is not a GET's
                before = process_cpu_s(weed.pid)
                for _ in store.read_objects(keys):
                    pass
                samples[name].append((process_cpu_s(weed.pid) - before) * 1000 / len(keys))
    finally:
        for weed, *_ in stores.values():
            weed.stop()
    medians = {name: round(statistics.median(v), 3) for name, v in samples.items()}
    default, one = medians.values()
    return {"objects": objects, "repeats": repeats, "load": os.getloadavg(),
            "store_cpu_ms_per_get_median": medians,
            "store_cpu_ms_per_get_rounds": {n: [round(x, 3) for x in v] for n, v in samples.items()},
            "ratio_one_thread_vs_default": round(one / default, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--size", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--store-objects", type=int, default=600)
    ap.add_argument("--store-repeats", type=int, default=10, help="0: skip the store's CPU")
    ap.add_argument("--out", default="results/store_get.json")
    args = ap.parse_args()
    weed = SeaweedFS(Path(tempfile.mkdtemp(prefix="store-get-")), 0, "bench",
                     "bench-secret-key")
    weed.start()
    try:
        store, keys = filled_store(weed, args.objects, args.size)
        data = {key: store.read_object(key) for key in keys}
        paths = {
            "get_bytes (minio client)": lambda: [store.get_bytes(k) for k in keys],
            "read_object, one at a time": lambda: [store.read_object(k) for k in keys],
            "read_objects, 8 pipelined": lambda: [b for _, b, _ in store.read_objects(keys)],
        }
        for read in paths.values():  # warm-up, and every path returns the stored bytes
            assert read() == [data[k] for k in keys]
        samples = {name: {"cpu": [], "wall": []} for name in paths}
        for _ in range(args.repeats):
            for name, read in paths.items():
                cpu, wall = time.thread_time(), time.perf_counter()
                read()
                samples[name]["cpu"].append((time.thread_time() - cpu) * 1000 / len(keys))
                samples[name]["wall"].append((time.perf_counter() - wall) * 1000 / len(keys))
        result = {"objects": args.objects, "size": args.size, "repeats": args.repeats,
                  "load": os.getloadavg(),
                  "ms_per_get": {name: {"cpu_median": round(statistics.median(s["cpu"]), 3),
                                        "wall_median": round(statistics.median(s["wall"]), 3)}
                                 for name, s in samples.items()}}
        base = result["ms_per_get"]["get_bytes (minio client)"]["cpu_median"]
        result["cpu_ratio_vs_minio"] = {name: round(v["cpu_median"] / base, 3)
                                        for name, v in result["ms_per_get"].items()}
    finally:
        weed.stop()
    if args.store_repeats:
        result["store_cpu"] = store_cpu_by_go_threads(args.store_objects, args.size, args.store_repeats)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

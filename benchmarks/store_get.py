"""CPU per object-store GET of the three read paths (issue 15's per-photo stages read through the
pipelined one), against a private SeaweedFS:

    SHOPLENS_SHARED_DIR=../shared .venv/bin/python benchmarks/store_get.py [--objects 200 --repeats 5]

``get_bytes`` (the minio client), ``read_object`` one at a time, and ``read_objects`` (8 requests
pipelined on one connection), alternating rounds in one process; thread CPU and wall ms per GET.
Writes ``results/store_get.json``.
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

from shoplens.config import Settings  # noqa: E402
from shoplens.dev.services import SeaweedFS, free_port_block  # noqa: E402
from shoplens.store import ObjectStore  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=200)
    ap.add_argument("--size", type=int, default=60_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/store_get.json")
    args = ap.parse_args()
    weed = SeaweedFS(Path(tempfile.mkdtemp(prefix="store-get-")), free_port_block(12), "bench",
                     "bench-secret-key")
    weed.start()
    try:
        settings = Settings().with_overrides(s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
                                             s3_secret_key=weed.secret_key, s3_bucket="bench")
        store = ObjectStore(settings)
        store.ensure_bucket()
        data = os.urandom(args.size)
        keys = [f"images/{i:05d}" for i in range(args.objects)]
        for key in keys:
            store.put_bytes(key, data, "image/jpeg")
        paths = {
            "get_bytes (minio client)": lambda: [store.get_bytes(k) for k in keys],
            "read_object, one at a time": lambda: [store.read_object(k) for k in keys],
            "read_objects, 8 pipelined": lambda: [b for _, b, _ in store.read_objects(keys)],
        }
        for read in paths.values():  # warm-up, and every path returns the stored bytes
            assert all(b == data for b in read())
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

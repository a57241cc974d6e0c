"""Does the TFRecord export make a dataset version faster to read than its image objects?

Populates a fresh manifest and SeaweedFS bucket with N review photos (real JPEGs of about the
size of crawled photos), builds one dataset version, then reads the version's images back two
ways in the same run, with the same number of client threads:

- baseline: one GET per image object (what a trainer reading the manifest.parquet would do),
- export: one GET per TFRecord shard (what the modeling stage reads),

and also times the build itself and a re-materialisation from the manifest (which re-reads every
image and rewrites every file).

Sharded export overhead: the version's files are exported again, alternately (ABBA, ``--rounds``
pairs), by

- one task: the whole version written into a local folder by one writer, then uploaded (what the
  build did before the export was mapped; uploaded under a prefix of its own), and
- the shard jobs run one after another in this process (``export.plan_shard_jobs``, every
  ``export.export_shard``, ``export.finish_export``: what the mapped DAG tasks do, minus
  Airflow's per-task start-up),

so their ratio is what cutting the export into jobs costs (a query, a temporary file and a PUT
per shard, a stat per shard when finishing). Writes results/dataset_export.json.

    nice -n 10 .venv/bin/python benchmarks/dataset_export.py [--images 1200] [--side 400]
        [--threads 8] [--images-per-shard 512] [--rounds 2]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import sqlalchemy as sa  # noqa: E402

from build_fixtures import ManifestWriter, migrate_for_build  # noqa: E402
from dataset.build import stage as build  # noqa: E402
from dataset.build import export  # noqa: E402
from shoplens import export_layout as layout  # noqa: E402
from shoplens.config import Settings  # noqa: E402
from shoplens.manifest import engine_for  # noqa: E402
from shoplens.dev.services import SeaweedFS  # noqa: E402
from shoplens.store import ObjectStore  # noqa: E402

PG_SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"


def timed_gets(store: ObjectStore, keys: list[str], threads: int) -> dict:
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(len(b) for b in pool.map(store.get_bytes, keys))
    seconds = time.perf_counter() - started
    return {"objects": len(keys), "bytes": total, "seconds": round(seconds, 3),
            "mb_per_s": round(total / seconds / 1e6, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--products", type=int, default=12)
    parser.add_argument("--side", type=int, default=400, help="JPEG side in pixels")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--images-per-shard", type=int, default=Settings().dataset_images_per_shard)
    parser.add_argument("--rounds", type=int, default=2, help="ABBA pairs of the export comparison")
    args = parser.parse_args()
    load_before = os.getloadavg()

    name = f"shoplens_bench_{uuid.uuid4().hex[:8]}"
    url = f"{PG_SERVER}/{name}"
    admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with tempfile.TemporaryDirectory() as tmp:
        weed = SeaweedFS(Path(tmp) / "weed", 0, "bench", "bench-secret-key")
        weed.start()
        try:
            migrate_for_build(url)
            settings = Settings().with_overrides(
                s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
                s3_secret_key=weed.secret_key, s3_bucket=f"bench-{uuid.uuid4().hex[:8]}",
                manifest_url=url, dataset_images_per_shard=args.images_per_shard)
            store = ObjectStore(settings)
            store.ensure_bucket()
            writer = ManifestWriter(url, settings, image_size=args.side)
            started = time.perf_counter()
            for p in range(args.products):
                writer.product(7000 + p)
                writer.photos(7000 + p, args.images // args.products)
            populate_s = time.perf_counter() - started

            started = time.perf_counter()
            stats = build.run(settings, "bench-1")
            build_s = time.perf_counter() - started
            version = stats["version_id"]

            started = time.perf_counter()
            export.rematerialise(settings, version, Path(tmp) / "re")
            rematerialise_s = time.perf_counter() - started

            with engine_for(url).connect() as conn:
                image_keys = conn.execute(sa.text(
                    "SELECT object_key FROM dataset_members WHERE version_id = :v ORDER BY sha256"),
                    {"v": version}).scalars().all()
            shard_keys = [k for k in store.list_keys(export.version_prefix(version) + "tfrecords/")]
            per_image = timed_gets(store, image_keys, args.threads)
            per_shard = timed_gets(store, shard_keys, args.threads)
            # second pass of each, in the other order, to even out cache effects
            per_shard_2 = timed_gets(store, shard_keys, args.threads)
            per_image_2 = timed_gets(store, image_keys, args.threads)

            def one_task() -> float:
                started = time.perf_counter()
                with tempfile.TemporaryDirectory(dir=tmp) as out:
                    export.rematerialise(settings, version, out)
                    layout.upload_version(store, f"{version}-one-task", Path(out))
                return time.perf_counter() - started

            def shard_jobs() -> float:
                started = time.perf_counter()
                for job in export.plan_shard_jobs(settings, version):
                    export.export_shard(settings, job)
                export.finish_export(settings, version)
                return time.perf_counter() - started

            timings: dict[str, list[float]] = {"one_task": [], "shard_jobs": []}
            for k in range(args.rounds):
                for name, export_once in ((("one_task", one_task), ("shard_jobs", shard_jobs))
                                          if k % 2 == 0 else
                                          (("shard_jobs", shard_jobs), ("one_task", one_task))):
                    timings[name].append(round(export_once(), 3))
            shards = len(export.plan_shard_jobs(settings, version))
            identical = export.verify_export(settings, version) == []
        finally:
            weed.stop()
            engine_for(url).dispose()
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    image_s = min(per_image["seconds"], per_image_2["seconds"])
    shard_s = min(per_shard["seconds"], per_shard_2["seconds"])
    best = {name: min(seconds) for name, seconds in timings.items()}
    result = {
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "images": stats["counts"]["images"],
        "image_side_px": args.side,
        "threads": args.threads,
        "populate_seconds": round(populate_s, 2),
        "build_seconds": round(build_s, 2),
        "build_images_per_s": round(stats["counts"]["images"] / build_s, 1),
        "rematerialise_seconds": round(rematerialise_s, 2),
        "read_per_image_object": [per_image, per_image_2],
        "read_per_tfrecord_shard": [per_shard, per_shard_2],
        "shard_read_speedup_vs_per_image_reads": round(image_s / shard_s, 2),
        "export_bytes": stats["files"]["bytes"],
        "images_per_shard": args.images_per_shard,
        "export_shards": shards,
        "export_seconds": timings,
        "export_shard_jobs_over_one_task": round(best["shard_jobs"] / best["one_task"], 3),
        "export_shard_jobs_equal_a_rematerialisation": identical,
    }
    out = REPO / "results" / "dataset_export.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

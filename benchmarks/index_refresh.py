"""Benchmark: the search index's nightly refresh (``modeling.catalogue_index.refresh``) after 1 %
new photos, against a full build of the same index, on a real manifest and object store.

N generated review photos (the replica's photo generator: one look per product, random framing,
pose and light; ``--products`` products) are stored in a private SeaweedFS bucket with the
manifest rows the crawl, dedup and filter stages would write, so that ``kept_images`` holds them.
With ``--hold-back`` (default 1 %) of them held back:

1. ``full``: the first refresh (a full build: every photo embedded);
2. ``incremental``: the held-back photos are added, the next refresh embeds only them;
3. ``nothing_new``: a refresh with no new photo (manifest reads, parent from the local cache,
   threshold calibration, upload of the product table and index.json; the backbone is not
   built);
4. ``full_again``: ``refresh(full=True)`` over all N photos (the rebuild an incremental refresh
   replaces; ``incremental_vs_full`` divides by it).

Every step is the stage entry itself, in this process (a step that embeds loads the network,
as a night's task would: the first build freezes it into the local index cache, later steps,
the full rebuild included, load the frozen network instead of building Keras). ``full_again`` minus ``incremental`` over the photos only the first
embeds is the per-photo cost; the rest of ``incremental`` is its fixed cost (backbone build,
bookkeeping): together a linear projection of the ratio to larger catalogues (labelled as a
projection in the results, not measured). Each step's summary carries the refresh's own
``timings`` (seconds by phase); ``incremental_timings`` in the results is the incremental
step's, i.e. where its fixed cost goes. ``--profile DIR`` also writes a cProfile dump per step
(DIR/<step>.prof; profiling slows TensorFlow's Python-heavy tracing several-fold, so its times
are for the split, not for the ratio).

    nice -n 10 .venv/bin/python benchmarks/index_refresh.py                 # ~2 min, 1,000 photos
    .venv/bin/python benchmarks/index_refresh.py --photos 300 --image-size 96   # quick
    nice -n 10 .venv/bin/python benchmarks/index_refresh.py --photos 5000 --products 500 \
        --out results/index_refresh_5000.json                                  # ~10 min
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PG_SERVER = os.environ.get("SHOPLENS_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")


def photos(count: int, products: int, seed: int) -> list[tuple[int, bytes]]:
    """(product id, JPEG bytes) for ``count`` photos spread over ``products`` products."""
    from crawler.replica.synthetic import product_looks, render_photo

    looks = product_looks(seed, products)
    rng = random.Random(f"index-refresh:{seed}")
    out = []
    for i in range(count):
        pid = 1 + i % products
        image = render_photo(looks[pid - 1], rng)
        image.thumbnail((320, 320))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=88)
        out.append((pid, buf.getvalue()))
    return out


class Manifest:
    """Crawl, dedup and filter rows for stored photos, written directly (each photo kept)."""

    def __init__(self, settings, products: int):
        from shoplens.manifest import engine_for
        from shoplens.store import ObjectStore

        self.engine, self.store = engine_for(settings.manifest_url), ObjectStore(settings)
        self.store.ensure_bucket()
        self.review = 0
        with self.engine.begin() as conn:
            self.run = conn.execute(sa.text(
                "INSERT INTO crawl_runs (run_key, shop_base_url) VALUES ('crawl', 'http://replica')"
                " RETURNING id")).scalar_one()
            self.filter_run = conn.execute(sa.text(
                "INSERT INTO filter_runs (run_key, status, detector_version, rule_version)"
                " VALUES ('filter', 'success', 'bench', 'bench') RETURNING id")).scalar_one()
            conn.execute(sa.text("INSERT INTO categories (id, name, first_seen_run, last_seen_run)"
                                 " VALUES ('10120000', 'beds', :r, :r)"), {"r": self.run})
            conn.execute(sa.text(
                "INSERT INTO products (id, category_id, name, price, source_url, first_seen_run,"
                " last_seen_run) VALUES (:p, '10120000', :n, 10000, :u, :r, :r)"),
                [{"p": p, "n": f"product {p}", "u": f"http://replica/p/{p}", "r": self.run}
                 for p in range(1, products + 1)])

    def add(self, batch: list[tuple[int, bytes]]) -> None:
        rows = []
        for pid, data in batch:
            sha = hashlib.sha256(data).hexdigest()
            key, _ = self.store.put_image(data, "jpeg", sha)
            self.review += 1
            rows.append({"s": sha, "k": key, "b": len(data), "p": pid, "rv": self.review,
                         "r": self.run, "f": self.filter_run})
        with self.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO reviews (id, product_id, source_url, first_seen_run)"
                                 " VALUES (:rv, :p, 'http://replica/r', :r)"), rows)
            conn.execute(sa.text(
                "INSERT INTO images (sha256, object_key, size_bytes, width, height, format,"
                " source_url, review_id, product_id, first_seen_run)"
                " VALUES (:s, :k, :b, 320, 320, 'jpeg', 'http://cdn/x', :rv, :p, :r)"), rows)
            conn.execute(sa.text(
                "INSERT INTO rule_decisions (sha256, rule, run_id, passed, rule_version,"
                " detector_version, params) VALUES (:s, 'single_product', :f, true, 'bench',"
                " 'bench', '{}')"), rows)
            conn.execute(sa.text(
                "INSERT INTO image_dedup (sha256, cluster_id, threshold, spans_products, run_id)"
                " VALUES (:s, :s, 6, false, :r)"), rows)


def timed(label: str, fn, profile_dir: Path | None = None) -> dict:
    t0 = time.monotonic()
    if profile_dir is not None:  # cProfile the step: <profile_dir>/<label>.prof
        import cProfile

        profile_dir.mkdir(parents=True, exist_ok=True)
        prof = cProfile.Profile()
        stats = prof.runcall(fn)
        prof.dump_stats(str(profile_dir / f"{label}.prof"))
    else:
        stats = fn()
    stats = {**stats, "wall_s": round(time.monotonic() - t0, 2)}
    print(f"{label}: {json.dumps(stats)}", file=sys.stderr, flush=True)
    return stats


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=int, default=1000)
    ap.add_argument("--products", type=int, default=100)
    ap.add_argument("--hold-back", type=float, default=0.01, help="share added for the refresh")
    ap.add_argument("--image-size", type=int, default=128, help="baseline embedding input, px")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "index_refresh.json")
    ap.add_argument("--profile", type=Path, default=None,
                    help="folder for a cProfile dump per step (<step>.prof); slows the steps")
    args = ap.parse_args(argv)
    os.environ.setdefault("SHOPLENS_PROGRESS", "log")
    from modeling import catalogue_index
    from shoplens.config import Settings
    from shoplens.dev.services import SeaweedFS
    from shoplens.manifest import engine_for, upgrade

    load_start = os.getloadavg()
    t0 = time.monotonic()
    generated = photos(args.photos, args.products, args.seed)
    held = max(1, round(args.photos * args.hold_back))
    work = Path(tempfile.mkdtemp(prefix="index-refresh-"))
    weed = SeaweedFS(work / "seaweedfs", 0, "bench", "bench-secret-key")
    weed.start()
    name = f"shoplens_bench_{uuid.uuid4().hex[:8]}"
    url = f"{PG_SERVER}/{name}"
    try:
        upgrade(url)
        settings = Settings().with_overrides(
            manifest_url=url, s3_endpoint=weed.endpoint, s3_access_key=weed.access_key,
            s3_secret_key=weed.secret_key, s3_bucket="bench", search_image_size=args.image_size,
            search_cache_dir=str(work / "cache"))
        manifest = Manifest(settings, args.products)
        manifest.add(generated[:-held])
        def step(label, run_key, full=False):
            steps[label] = timed(
                label, lambda: catalogue_index.refresh(settings, run_key, full=full), args.profile)

        steps: dict = {}
        step("full", "night-1")
        manifest.add(generated[-held:])
        step("incremental", "night-2")
        step("nothing_new", "night-3")
        step("full_again", "night-4", full=True)
        full, inc = steps["full_again"]["seconds"], steps["incremental"]["seconds"]
        # Both build the backbone and do the same bookkeeping: their difference is the cost of
        # the photos only one of them embeds; what is left of the incremental one is fixed.
        per_photo = max(0.0, (full - inc) / (args.photos - held))
        fixed = max(0.0, inc - per_photo * held)
        projection = {str(n): round((fixed + per_photo * n * args.hold_back)
                                    / (fixed + per_photo * n), 4)
                      for n in (10_000, 100_000, 1_000_000)}
        out = {"benchmark": "index_refresh", "photos": args.photos, "products": args.products,
               "new_photos": held, "image_size": args.image_size, "steps": steps,
               "incremental_vs_full": round(inc / full, 4),
               "embedded": {k: v["embedded"] for k, v in steps.items()},
               "fixed_s": round(fixed, 2), "nothing_new_s": steps["nothing_new"]["seconds"],
               "per_photo_ms": round(1000 * per_photo, 2),
               "incremental_timings": steps["incremental"].get("timings"),
               "projected_incremental_vs_full_at_photos": projection,
               "target_incremental_vs_full": 0.05,
               "command": "benchmarks/index_refresh.py " + " ".join(
                   argv if argv is not None else sys.argv[1:]),
               "wall_s": round(time.monotonic() - t0, 1), "cpu_count": os.cpu_count(),
               "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1))
        print(json.dumps({k: out[k] for k in ("incremental_vs_full", "embedded", "fixed_s",
                                              "per_photo_ms", "incremental_timings",
                                              "projected_incremental_vs_full_at_photos")}))
        print(f"wall {out['wall_s']} s; results in {args.out}")
    finally:
        engine_for(url).dispose()
        weed.stop()
        shutil.rmtree(work, ignore_errors=True)
        admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Crawler throughput vs a plain aiohttp downloader, against the same replica, in one run.

    .venv/bin/python benchmarks/crawl.py [--concurrency 8] [--listing CSV | --synthetic]

(a) the crawler (Scrapy in its child processes, validating, storing in SeaweedFS and recording in
PostgreSQL) crawls every category with no delay and ``concurrent_per_host = C``;
(b) a bare asyncio/aiohttp client downloads the very same image URLs (read back from the manifest)
with C requests in flight, discarding the bytes. (b) runs once before and once after (a); the
faster of the two is the baseline, so that a cold or warm page cache cannot flatter the ratio.
The replica runs as its own process so that neither client shares an interpreter with it.
Writes results/crawl.json. Default catalogue: the grocery listing when ../shared is present,
else the replica's generated photo set.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

import crawler  # noqa: E402
from shoplens.config import Settings  # noqa: E402
from shoplens.manifest import engine_for  # noqa: E402
from shoplens.services import SeaweedFS, free_port_block, stop_pid, wait_for_port  # noqa: E402

PG_SERVER = os.environ.get("SHOPLENS_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")


async def plain_download(urls: list[str], concurrency: int) -> dict:
    import aiohttp

    semaphore = asyncio.Semaphore(concurrency)
    sizes: list[int] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def fetch(url: str) -> None:
            nonlocal errors
            async with semaphore:
                async with session.get(url) as resp:
                    body = await resp.read()
                    if resp.status == 200:
                        sizes.append(len(body))
                    else:
                        errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(fetch(u) for u in urls))
        elapsed = time.perf_counter() - started
    return {"photos": len(sizes), "errors": errors, "seconds": round(elapsed, 3),
            "photos_per_s": round(len(sizes) / elapsed, 2), "bytes": sum(sizes)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--listing", type=Path, default=None)
    parser.add_argument("--synthetic", action="store_true", help="use the generated photo set")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "crawl.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="shoplens-bench-crawl-"))
    listing = args.listing
    grocery = REPO.parent / "shared" / "datasets" / "grocery"
    if listing is None and not args.synthetic and grocery.exists():
        from crawler.replica.listings import grocery_listing, write_listing

        listing = work / "grocery.csv"
        write_listing(grocery_listing(grocery, "train"), listing)
    catalogue = f"listing {listing}" if listing else "replica generated photo set (seed 0)"

    port = free_port_block(2)
    replica_cmd = [sys.executable, "-m", "crawler.replica", "--port", str(port), "--seed", "0"]
    if listing:
        replica_cmd += ["--listing", str(listing)]
    replica = subprocess.Popen(replica_cmd, cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    weed = SeaweedFS(work / "weed", free_port_block(12), "bench-key", "bench-secret-key")
    db_name = f"shoplens_bench_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    try:
        wait_for_port(port, timeout=600, proc=replica)
        wait_for_port(port + 1, timeout=60, proc=replica)
        weed.start()
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{db_name}"'))
        base = f"http://127.0.0.1:{port}"
        categories = [c["id"] for c in json.loads(_get(f"{base}/__replica/ground-truth.json"))
                      ["categories"]]
        settings = Settings().with_overrides(
            shop_base_url=base, allowed_hosts=[f"127.0.0.1:{port + 1}"], categories=categories,
            best_n=20, download_delay=0.0, autothrottle=False,
            concurrent_per_host=args.concurrency, reviews_per_page=50,
            manifest_url=f"{PG_SERVER}/{db_name}", s3_endpoint=weed.endpoint,
            s3_access_key=weed.access_key, s3_secret_key=weed.secret_key, s3_bucket="bench")

        # Before the crawl, the baseline takes the photo URLs from the ground truth (at the same
        # fixed size); after it, the URLs the crawler actually stored, read from the manifest.
        from crawler.site import ShopSite

        site = ShopSite(base, settings.image_params)
        truth = json.loads(_get(f"{base}/__replica/ground-truth.json"))
        best = {p for c in truth["categories"] for p in c["product_ids_by_rank"][:20]}
        truth_urls = [site.image_url(r["photo_url"]) for r in truth["reviews"]
                      if r["photo_url"] and r["product_id"] in best]
        baseline_before = asyncio.run(plain_download(truth_urls, args.concurrency))

        crawler.start_run(settings, "bench")
        per_category = []
        started = time.perf_counter()
        for category_id in categories:
            per_category.append(crawler.crawl_category(settings, category_id, "bench"))
        wall = time.perf_counter() - started
        summary = crawler.finish_run(settings, "bench")
        with engine_for(settings.manifest_url).connect() as conn:
            urls = [u for (u,) in conn.execute(sa.text("SELECT source_url FROM images"))]
        baseline_after = asyncio.run(plain_download(urls, args.concurrency))

        photos = sum(s["photos_stored"] for s in per_category)
        image_phase = sum(s["image_phase_s"] or 0 for s in per_category)
        baseline = max((baseline_before, baseline_after), key=lambda b: b["photos_per_s"])
        crawler_image_rate = photos / image_phase if image_phase else 0.0
        result = {
            "catalogue": catalogue, "concurrency_per_host": args.concurrency,
            "categories": len(categories), "photos": photos,
            "crawler": {
                "image_phase_s": round(image_phase, 3),
                "image_phase_photos_per_s": round(crawler_image_rate, 2),
                "end_to_end_s": round(wall, 3),
                "end_to_end_photos_per_s": round(photos / wall, 2),
                "requests": sum(s["requests"] for s in per_category),
                "failures": summary["failures"],
                "per_category": [{k: s[k] for k in ("category_id", "photos_stored", "elapsed_s",
                                                    "image_phase_s", "requests")}
                                 for s in per_category],
            },
            "baseline_aiohttp": {"before_crawl": baseline_before, "after_crawl": baseline_after,
                                 "used": baseline["photos_per_s"]},
            "ratio_image_phase": round(crawler_image_rate / baseline["photos_per_s"], 3),
            "ratio_end_to_end": round(photos / wall / baseline["photos_per_s"], 3),
            "target_ratio": 0.8,
            "machine": {"cpus": os.cpu_count(), "loadavg_after": os.getloadavg()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(json.dumps(result, indent=2, ensure_ascii=False))
        return 0
    finally:
        stop_pid(replica.pid)
        weed.stop()
        engine_for.cache_clear()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        admin.dispose()


def _get(url: str) -> str:
    import urllib.request

    req = urllib.request.Request(url, headers={"X-Replica-Admin": "1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read().decode()


if __name__ == "__main__":
    raise SystemExit(main())

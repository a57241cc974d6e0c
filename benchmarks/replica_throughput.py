"""Is the replica shop fast enough not to be a crawl benchmark's bottleneck?

Measures image requests per second against the replica's CDN (originals, resized cold, resized
warm from the LRU cache) and its review API, and, in the same run, a baseline: a bare aiohttp
handler returning the same photo bytes from memory (the least any HTTP server can do). Writes
results/replica_throughput.json with the ratios to the baseline.

    .venv/bin/python benchmarks/replica_throughput.py [--listing CSV] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crawler.replica import ReplicaShop  # noqa: E402


async def _hammer(urls: list[str], concurrency: int, headers: dict | None = None,
                  cookies: dict | None = None) -> dict:
    queue = list(reversed(urls))
    latencies: list[float] = []
    errors = 0
    async with aiohttp.ClientSession(headers=headers, cookies=cookies) as session:
        async def worker():
            nonlocal errors
            while queue:
                url = queue.pop()
                started = time.perf_counter()
                async with session.get(url) as response:
                    await response.read()
                    errors += response.status != 200
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(urls), "errors": errors, "seconds": round(elapsed, 3),
            "per_second": round(len(urls) / elapsed, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
            "p95_ms": round(1000 * latencies[int(len(latencies) * 0.95)], 2)}


async def _baseline(bodies: list[bytes], concurrency: int) -> dict:
    app = web.Application()

    async def handler(request):
        return web.Response(body=bodies[int(request.match_info["i"])],
                            headers={"Content-Type": "image/jpeg"})

    app.router.add_get("/{i}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    site = web.SockSite(runner, sock)
    await site.start()
    port = sock.getsockname()[1]
    try:
        return await _hammer([f"http://127.0.0.1:{port}/{i}" for i in range(len(bodies))],
                             concurrency)
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listing", type=Path, help="default: the generated photo set")
    parser.add_argument("--photos", type=int, default=300, help="photos per measurement")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "replica_throughput.json")
    args = parser.parse_args()

    with ReplicaShop(listing=args.listing, seed=0) as shop:
        photos = sorted(shop.catalog.photos.values(), key=lambda r: r.id)[: args.photos]
        urls = [f"{shop.cdn_url}/apne2/any/uploads/cards/snapshots/{r.photo_id}.jpg" for r in photos]
        bodies = [r.photo_path.read_bytes() for r in photos]
        resized = [u + "?w=320&h=320" for u in urls]
        product_ids = [p.id for p in shop.catalog.products.values()]
        api = [f"{shop.base_url}/api/goods/reviews?productionId={product_ids[i % len(product_ids)]}"
               f"&page={1 + i // len(product_ids)}&per=20" for i in range(args.photos)]
        api_headers = {"Referer": shop.base_url + "/goods/1"}
        cookies = {"ohs_waf": shop.runtime.waf.mint()}

        async def run_all() -> dict:
            out = {"baseline_bytes_from_memory": await _baseline(bodies, args.concurrency)}
            out["cdn_originals"] = await _hammer(urls, args.concurrency)
            out["cdn_resized_cold"] = await _hammer(resized, args.concurrency)
            out["cdn_resized_warm"] = await _hammer(resized, args.concurrency)
            out["review_api"] = await _hammer(api, args.concurrency, api_headers, cookies)
            return out

        measured = asyncio.run(run_all())
    base = measured["baseline_bytes_from_memory"]["per_second"]
    for name, row in measured.items():
        row["ratio_to_baseline"] = round(row["per_second"] / base, 3)
    result = {"source": str(args.listing or "generated set"), "photos": len(photos),
              "concurrency": args.concurrency, "mean_photo_bytes": sum(map(len, bodies)) // len(bodies),
              "measurements": measured}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Crawler throughput vs a plain asyncio downloader, against the same replica, in one run.

    .venv/bin/python benchmarks/crawl.py [--concurrency 8] [--repeats 2] [--latency-ms 0,20,50,100]
                                         [--crawlers twisted:1[,aiohttp:1,twisted:2]]
                                         [--listing CSV | --synthetic] [--out results/crawl.json]

For each latency (the replica, in its own process, holds every answer that long, like a server
across a network; 0 = loopback speed), ``--repeats`` rounds of, in alternating order:
(a) the crawler: the whole stage (the categories dealt into PARALLEL groups, one Scrapy child
    process per group crawling its categories at once, as the nightly DAG does; Pillow decode,
    SeaweedFS PUT, PostgreSQL rows) crawls every category into a fresh manifest and bucket, no
    delay, AutoThrottle off, ``concurrent_per_host = C`` shared by the crawl processes that run
    at once (``Settings.share_of_shop``; the nightly DAG runs 2 at once, C/2 each) and within a
    process by its categories (``SharedHostGate``), so the shop never sees more than C requests
    in flight; once per ``--crawlers`` entry ``HTTP_CLIENT:PARALLEL`` (the ``http_client``
    setting: Scrapy's Twisted handler or its experimental aiohttp one; PARALLEL crawl processes
    at once), the order alternating per round; the target is judged on the first (default
    ``twisted:1``: one crawl process with all C slots, like the plain client);
(b) the plain downloader: a bare aiohttp client fetches the very same photo URLs with C
    requests in flight and discards the bytes (run before and after (a); the faster is used,
    so that a warm or cold cache cannot flatter the ratio);
(c) an extra line: asyncio doing the crawler's storage work too (the same aiohttp download, then
    the crawler's own validate + PUT in threads and group-committed manifest rows), so the gap
    between (a) and (b) can be split into storage work and Scrapy.
The ratio (a)/(b) (its old target >= 0.8 is retired by issue 15: the crawl's targets are now
benchmarks/crawl_economics.py's) is taken on the image phase of each round (from a category's
first photo request to its last photo row; where crawls overlap, the time covered by any of
them); end to end (process starts, ranking, product and review pages included) is reported too.
Per round, the replica also reports how many requests each client kept in flight at the CDN on
average while it had any (``cdn_mean_in_flight``; C is the most allowed), which shows where the
crawler loses time at high latency, and the machine's CPU is split by process (``cpu``: busy
cores on average, CPU ms per photo for the crawl processes, the replica, the object store,
PostgreSQL and the rest), which shows whether the machine or one process is the limit.
Writes results/crawl.json. Default catalogue: the grocery listing when ../shared is present,
else the replica's generated photo set.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

import crawler  # noqa: E402
from shoplens.config import HTTP_CLIENTS, Settings  # noqa: E402
from shoplens.manifest import engine_for  # noqa: E402
from shoplens.dev.services import SeaweedFS, free_port_block, stop_pid, wait_for_port  # noqa: E402

from procstat import cpu_seconds, machine_busy_seconds  # noqa: E402  (benchmarks/)

PG_SERVER = os.environ.get("SHOPLENS_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")
TARGET_RATIO = 0.8


async def plain_download(urls: list[str], concurrency: int) -> dict:
    """(b): fetch every URL, C in flight, keep nothing."""
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


async def download_and_store(photos: list[dict], concurrency: int, settings: Settings,
                             run_key: str, threads: int) -> dict:
    """(c): the plain download plus the crawler's own storage work for each photo."""
    import aiohttp

    from crawler.group_commit import GroupCommit
    from crawler.images import IMAGE_CONTENT_TYPES, validate_image
    from crawler.manifest_writer import ManifestWriter, PhotoRow
    from shoplens.store import ObjectStore, image_key

    store = ObjectStore(settings)
    writer = ManifestWriter.for_run_key(settings.manifest_url, run_key)
    rows = GroupCommit(writer.record_photos, max_batch=200)
    workers = ThreadPoolExecutor(threads, thread_name_prefix="bench-photo")
    loop = asyncio.get_running_loop()
    semaphore = asyncio.Semaphore(concurrency)
    stored = 0

    def validate_and_put(body: bytes, content_type: str):
        image = validate_image(body, content_type, max_pixels=settings.max_image_pixels,
                               max_bytes=settings.max_image_bytes)
        key = image_key(image.sha256, image.format)
        store.write_object(key, body, IMAGE_CONTENT_TYPES[image.format], sha256=image.sha256)
        return image, key

    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def one(photo: dict) -> None:
            nonlocal stored
            async with semaphore:
                async with session.get(photo["url"]) as resp:
                    body = await resp.read()
                    content_type = resp.headers.get("Content-Type", "")
            image, key = await loop.run_in_executor(workers, validate_and_put, body, content_type)
            await rows.submit(PhotoRow(
                sha256=image.sha256, object_key=key, size_bytes=image.size_bytes,
                width=image.width, height=image.height, format=image.format,
                source_url=photo["url"], review_id=photo["review_id"],
                product_id=photo["product_id"]))
            stored += 1

        started = time.perf_counter()
        await asyncio.gather(*(one(p) for p in photos))
        elapsed = time.perf_counter() - started
    workers.shutdown()
    return {"photos": stored, "seconds": round(elapsed, 3),
            "photos_per_s": round(stored / elapsed, 2), "transactions": rows.transactions}


class Bench:
    def __init__(self, args, work: Path, listing: Path | None, pg_server: str = PG_SERVER):
        self.args = args
        self.work = work
        self.listing = listing
        self.pg_server = pg_server
        self.admin = sa.create_engine(f"{pg_server}/postgres", isolation_level="AUTOCOMMIT")
        self.databases: list[str] = []
        self.weed = SeaweedFS(work / "weed", 0, "bench-key", "bench-secret-key",
                              go_max_procs=getattr(args, "store_go_procs", SeaweedFS.go_max_procs))

    def fresh_settings(self, base: str, cdn: str, categories: list[str]) -> Settings:
        name = f"shoplens_bench_{uuid.uuid4().hex[:8]}"
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.databases.append(name)
        return Settings().with_overrides(
            shop_base_url=base, allowed_hosts=[cdn], categories=categories, best_n=20,
            download_delay=0.0, autothrottle=False, concurrent_per_host=self.args.concurrency,
            reviews_per_page=50, manifest_url=f"{self.pg_server}/{name}",
            s3_endpoint=self.weed.endpoint,
            s3_access_key=self.weed.access_key, s3_secret_key=self.weed.secret_key,
            s3_bucket=f"bench-{uuid.uuid4().hex[:10]}")

    def drop_databases(self) -> None:
        engine_for.cache_clear()
        with self.admin.connect() as conn:
            for name in self.databases:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.admin.dispose()

    def start_replica(self, latency_ms: float, hold_back: int = 0) -> tuple[subprocess.Popen, int]:
        """The replica in its own process; ``hold_back`` photo reviews hidden until released."""
        port = free_port_block(2)
        cmd = [sys.executable, "-m", "crawler.replica", "--port", str(port), "--seed", "0",
               "--latency", str(latency_ms / 1000), "--hold-back", str(hold_back)]
        if self.listing:
            cmd += ["--listing", str(self.listing)]
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(port, timeout=600, proc=proc)
        wait_for_port(port + 1, timeout=60, proc=proc)
        return proc, port

    def crawl(self, settings: Settings, parallel: int) -> dict:
        return crawl_all(settings, parallel)

    def one_latency(self, latency_ms: float) -> dict:
        replica, port = self.start_replica(latency_ms)
        try:
            base, cdn = f"http://127.0.0.1:{port}", f"127.0.0.1:{port + 1}"
            categories, photos = replica_photos(base)
            urls = [p["url"] for p in photos]
            c = self.args.concurrency
            meter = CpuMeter(replica.pid, self.weed.pid)
            rounds = []
            setups = self.args.crawlers
            for r in range(self.args.repeats):
                load_before = os.getloadavg()[0]
                storage_first = r % 2 == 1  # alternate which side runs right after the replica warms
                storage = None
                if storage_first:
                    storage = self.storage_round(base, cdn, categories, photos)
                cdn_0, cpu_0 = _cdn_counters(base, cdn), meter.snapshot()
                plain_before = asyncio.run(plain_download(urls, c))
                plain_before["cdn_mean_in_flight"] = _mean_in_flight(cdn_0, _cdn_counters(base, cdn))
                plain_before["cpu"] = meter.usage(cpu_0, meter.snapshot(), plain_before["photos"])
                crawled = {}
                for setup in (setups if r % 2 == 0 else setups[::-1]):
                    crawled[setup] = self.measured_crawl(base, cdn, categories, meter, setup, urls)
                plain_after = asyncio.run(plain_download(urls, c))
                if not storage_first:
                    storage = self.storage_round(base, cdn, categories, photos)
                plain = max(plain_before["photos_per_s"], plain_after["photos_per_s"])
                default = crawled[setups[0]]
                rounds.append({
                    "round": r, "loadavg_before": round(load_before, 2),
                    "loadavg_after": round(os.getloadavg()[0], 2),
                    "same_urls": all(x["same_urls"] for x in crawled.values()),
                    "crawler": default,
                    "plain_download": {"before_crawl": plain_before, "after_crawl": plain_after,
                                       "used_photos_per_s": plain},
                    "asyncio_with_storage": storage,
                    "ratio_image_phase": round(default["image_phase_photos_per_s"] / plain, 3),
                    "ratio_image_phase_by_crawler": {
                        k: round(x["image_phase_photos_per_s"] / plain, 3) for k, x in crawled.items()},
                    "round_cdn_mean_in_flight": {**{k: x["cdn_mean_in_flight"] for k, x in crawled.items()},
                                                 "plain": plain_before["cdn_mean_in_flight"]},
                    "round_cores_busy": {**{k: x["cpu"]["cores_busy"] for k, x in crawled.items()},
                                         "plain": plain_before["cpu"]["cores_busy"]},
                    "ratio_end_to_end": round(default["end_to_end_photos_per_s"] / plain, 3),
                    "ratio_image_phase_vs_asyncio_with_storage": round(
                        default["image_phase_photos_per_s"] / storage["photos_per_s"], 3),
                    "other_crawlers": {k: x for k, x in crawled.items() if k != setups[0]},
                })
                print(json.dumps({"latency_ms": latency_ms, **{k: v for k, v in rounds[-1].items()
                                                              if k.startswith(("ratio", "round"))}}),
                      file=sys.stderr, flush=True)
            return {
                "latency_ms": latency_ms, "photos": len(urls), "crawler": setups[0],
                "rounds": rounds,
                "median_ratio_image_phase": _median(rounds, "ratio_image_phase"),
                "median_ratio_end_to_end": _median(rounds, "ratio_end_to_end"),
                "median_ratio_image_phase_vs_asyncio_with_storage": _median(
                    rounds, "ratio_image_phase_vs_asyncio_with_storage"),
                "median_ratio_image_phase_by_crawler": {
                    k: round(statistics.median(r["ratio_image_phase_by_crawler"][k]
                                               for r in rounds), 3) for k in setups},
                "target_met_image_phase": _median(rounds, "ratio_image_phase") >= TARGET_RATIO,
            }
        finally:
            stop_pid(replica.pid)

    def measured_crawl(self, base: str, cdn: str, categories: list[str], meter: "CpuMeter",
                       setup: str, urls: list[str]) -> dict:
        """(a) into a fresh manifest and bucket, with the CDN's slot use, the machine's CPU and
        whether it stored exactly ``urls``."""
        http_client, parallel = setup.split(":")
        settings = self.fresh_settings(base, cdn, categories).with_overrides(http_client=http_client)
        cdn_before, cpu_before = _cdn_counters(base, cdn), meter.snapshot()
        crawled = self.crawl(settings, int(parallel))
        crawled["cdn_mean_in_flight"] = _mean_in_flight(cdn_before, _cdn_counters(base, cdn))
        crawled["cpu"] = meter.usage(cpu_before, meter.snapshot(), crawled["photos"])
        with engine_for(settings.manifest_url).connect() as conn:
            stored = {u for (u,) in conn.execute(sa.text("SELECT source_url FROM images"))}
        crawled["same_urls"] = stored == set(urls)
        return crawled

    def storage_round(self, base: str, cdn: str, categories: list[str], photos: list[dict],
                      meter: "CpuMeter | None" = None) -> dict:
        """(c) into its own manifest: the reviews rows the photo rows point to come first.
        With ``meter``: ``cpu_spent_s``, CPU seconds per group during the download and storage
        only (the set-up above is left out)."""
        settings = self.fresh_settings(base, cdn, categories)
        crawler.start_run(settings, "bench-storage")
        _copy_reviews(photos, settings)
        threads = min(10, max(2, 2 * self.args.concurrency))  # as crawler.scrapy_settings
        before = meter.snapshot() if meter else None
        # Python's own event loop, or uvloop as the crawler's (crawler/scrapy_settings.py):
        # the same loop on both sides when asked.
        loop_factory = None
        if getattr(self.args, "baseline_loop", "asyncio") == "uvloop":
            import uvloop
            loop_factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            result = runner.run(download_and_store(photos, self.args.concurrency, settings,
                                                   "bench-storage", threads))
        if meter:
            result["cpu_spent_s"] = CpuMeter.spent(before, meter.snapshot())
        return result


def crawl_all(settings: Settings, parallel: int, run_key: str = "bench") -> dict:
    """Every category, as the nightly DAG crawls them: dealt into ``parallel`` groups
    (``crawler.run.category_groups``), one crawl process per group (its categories at once,
    sharing the group's budget), the groups at once, each with its share of the per-host budget
    (``Settings.share_of_shop``). ``night_s``: the whole night, the run's start (migration
    check, bucket) and finish included."""
    from crawler.run import category_groups

    night_started = time.perf_counter()
    crawler.start_run(settings, run_key)
    share = settings.share_of_shop(parallel)
    started = time.perf_counter()
    groups = category_groups(settings.categories, parallel)
    with ThreadPoolExecutor(len(groups)) as pool:
        per_category = [stats for by_id in pool.map(
            lambda group: crawler.crawl_categories(share, group, run_key), groups)
            for stats in by_id.values()]
    wall = time.perf_counter() - started
    summary = crawler.finish_run(settings, run_key)
    night = time.perf_counter() - night_started
    photos = sum(s["photos_stored"] for s in per_category)
    image_phase = _union_length([(s["image_phase_from"], s["image_phase_to"])
                                 for s in per_category if s["image_phase_from"]])
    return {
        "photos": photos, "image_phase_s": round(image_phase, 3),
        "image_phase_photos_per_s": round(photos / image_phase, 2) if image_phase else 0.0,
        "end_to_end_s": round(wall, 3), "end_to_end_photos_per_s": round(photos / wall, 2),
        "night_s": round(night, 3), "requests": sum(s["requests"] for s in per_category),
        # Each category reports its process's count so far (one transaction stream per process).
        "photo_transactions": sum(max(s.get("photo_transactions", 0) for s in per_category
                                      if s.get("pid") == pid)
                                  for pid in {s.get("pid") for s in per_category}),
        "failures": summary["failures"],
        "crawl_processes": len(groups),
        "per_category": [{k: s.get(k) for k in ("category_id", "photos_stored", "elapsed_s",
                                                "process_s", "image_phase_s", "requests")}
                         for s in per_category],
    }


def replica_photos(base: str, best_n: int = 20) -> tuple[list[str], list[dict]]:
    """The replica's categories and, from its ground truth, the photos a crawl of the best-N
    products of every category fetches (URL at the crawler's fixed size, review, product)."""
    from crawler.site import ShopSite

    truth = json.loads(_get(f"{base}/__replica/ground-truth.json"))
    site = ShopSite(base, Settings().image_params)
    best = {p for c in truth["categories"] for p in c["product_ids_by_rank"][:best_n]}
    photos = [{"url": site.image_url(r["photo_url"]), "review_id": r["id"],
               "product_id": r["product_id"]}
              for r in truth["reviews"] if r["photo_url"] and r["product_id"] in best]
    return [c["id"] for c in truth["categories"]], photos


def _copy_reviews(photos: list[dict], settings: Settings) -> None:
    from shoplens.manifest.schema import categories, crawl_runs, products, reviews

    engine = engine_for(settings.manifest_url)
    with engine.begin() as conn:
        run_id = conn.execute(sa.select(sa.func.max(crawl_runs.c.id))).scalar_one()
        conn.execute(categories.insert().values(id="0", name="bench", source_url="bench",
                                                first_seen_run=run_id, last_seen_run=run_id))
        conn.execute(products.insert(), [
            dict(id=pid, category_id="0", name="bench", source_url="bench",
                 first_seen_run=run_id, last_seen_run=run_id)
            for pid in sorted({p["product_id"] for p in photos})])
        conn.execute(reviews.insert(), [
            dict(id=p["review_id"], product_id=p["product_id"], photo_url=p["url"],
                 source_url="bench", first_seen_run=run_id) for p in photos])


def _cdn_counters(base: str, cdn: str) -> dict:
    """The replica's running totals for the CDN host (busy seconds, in-flight seconds)."""
    return json.loads(_get(f"{base}/__replica/stats"))["hosts"].get(cdn, {})


def _mean_in_flight(before: dict, after: dict) -> float | None:
    """How many requests a client kept in flight at the CDN, on average while it had any:
    the share of its allowed concurrency it kept busy (the rest is its own processing time)."""
    busy = after.get("busy_s", 0.0) - before.get("busy_s", 0.0)
    weighted = after.get("in_flight_s", 0.0) - before.get("in_flight_s", 0.0)
    return round(weighted / busy, 2) if busy > 0 else None


def _crawl_worker_cpu() -> float:
    """CPU seconds of the crawl worker (crawler/worker.py: the forkserver the crawl processes
    are forked from) and of its ended crawl processes; they are not this process's children,
    so ``os.times`` misses them."""
    from crawler.worker import worker_pid

    pid = worker_pid()
    spent = cpu_seconds(f"/proc/{pid}/stat") if pid else None
    return sum(spent) if spent else 0.0


class CpuMeter:
    """Where the machine's CPU goes while one side runs: core-seconds per process group.

    Groups: this benchmark's child processes (the crawl processes, counted when they end, and
    the crawl worker they are forked from),
    this process itself (the plain downloader runs here), the replica, the object store and
    PostgreSQL (live backends plus those that ended, through the postmaster's children
    times; with ``postmaster_pid``, that server only, else every PostgreSQL process on the
    machine), and the whole machine from /proc/stat; "other" is the machine minus the groups.
    """

    def __init__(self, replica_pid: int, store_pid: int | None, postmaster_pid: int | None = None):
        self.pids = {"replica": replica_pid, "object_store": store_pid}
        self.postmaster_pid = postmaster_pid

    def snapshot(self) -> dict:
        own = os.times()
        groups = {"children": own.children_user + own.children_system + _crawl_worker_cpu(),
                  "this_process": own.user + own.system}
        for name, pid in self.pids.items():
            groups[name] = (cpu_seconds(f"/proc/{pid}/stat") or (0.0, 0.0))[0] if pid else 0.0
        groups["postgres"] = _postgres_cpu(self.postmaster_pid)
        return {"t": time.perf_counter(), "machine": machine_busy_seconds(), **groups}

    @staticmethod
    def spent(before: dict, after: dict) -> dict:
        """CPU seconds per group between two snapshots (``wall_s``: the time between them)."""
        spent = {k: after[k] - before[k] for k in before if k != "t"}
        spent["other"] = spent["machine"] - sum(v for k, v in spent.items() if k != "machine")
        return {"wall_s": after["t"] - before["t"], **spent}

    @staticmethod
    def usage(before: dict, after: dict, photos: int) -> dict:
        """Busy cores on average, and CPU milliseconds per photo for each group."""
        spent = CpuMeter.spent(before, after)
        wall = spent.pop("wall_s")
        return {"wall_s": round(wall, 3), "cores_busy": round(spent["machine"] / wall, 2),
                "cores": os.cpu_count(),
                "cpu_ms_per_photo": {k: round(1000 * v / max(photos, 1), 2)
                                     for k, v in spent.items()}}


def _postgres_cpu(postmaster: int | None = None) -> float:
    """All PostgreSQL processes' CPU seconds, backends that already ended included; with
    ``postmaster``, only that server's (it and its children)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if comm.startswith("postgres") and (postmaster is None
                                                or postmaster in (int(entry.name), ppid)):
                procs[int(entry.name)] = ppid
    total = 0.0
    for pid, ppid in procs.items():
        own, ended_children = cpu_seconds(f"/proc/{pid}/stat") or (0.0, 0.0)
        total += own + (ended_children if ppid not in procs else 0.0)  # the postmaster
    return total


def _union_length(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the intervals."""
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(intervals):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def _median(rounds: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rounds), 3)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--latency-ms", default="0,20,50,100",
                        help="comma list of replica answer delays to measure at (ms)")
    parser.add_argument("--crawlers", default="twisted:1",
                        help="comma list of HTTP_CLIENT:PARALLEL crawler set-ups run each round "
                             "(http_client setting, category crawls at once); the target is "
                             "judged on the first")
    parser.add_argument("--listing", type=Path, default=None)
    parser.add_argument("--synthetic", action="store_true", help="use the generated photo set")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "crawl.json")
    args = parser.parse_args()
    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    args.crawlers = [x.strip() for x in args.crawlers.split(",") if x.strip()]
    for setup in args.crawlers:
        client, _, parallel = setup.partition(":")
        if client not in HTTP_CLIENTS:
            parser.error(f"--crawlers entry {setup!r}: HTTP_CLIENT is one of {HTTP_CLIENTS}")
        if not parallel.isdigit() or int(parallel) < 1 or args.concurrency % int(parallel):
            parser.error(f"--crawlers entry {setup!r}: PARALLEL must divide --concurrency")

    work = Path(tempfile.mkdtemp(prefix="shoplens-bench-crawl-"))
    listing = args.listing
    grocery = REPO.parent / "shared" / "datasets" / "grocery"
    if listing is None and not args.synthetic and grocery.exists():
        from crawler.replica.listings import grocery_listing, write_listing

        listing = work / "grocery.csv"
        write_listing(grocery_listing(grocery, "train"), listing)
    catalogue = f"listing {listing}" if listing else "replica generated photo set (seed 0)"

    bench = Bench(args, work, listing)
    try:
        bench.weed.start()
        by_latency = [bench.one_latency(latency) for latency in latencies]
    finally:
        bench.weed.stop()
        bench.drop_databases()
        shutil.rmtree(work, ignore_errors=True)  # the store's files
    result = {
        "catalogue": catalogue, "concurrency_per_host": args.concurrency,
        "repeats": args.repeats, "target_ratio": TARGET_RATIO,
        "summary": [{k: v for k, v in b.items() if k != "rounds"} for b in by_latency],
        "by_latency": by_latency,
        "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result["summary"], indent=2, ensure_ascii=False))
    return 0


def _get(url: str) -> str:
    import urllib.request

    req = urllib.request.Request(url, headers={"X-Replica-Admin": "1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read().decode()


if __name__ == "__main__":
    raise SystemExit(main())

"""Crawl economics: CPU per stored photo, the crawler against asyncio doing the same storage
work, and what an incremental night costs against a full crawl, all from one run.

    .venv/bin/python benchmarks/crawl_economics.py [--latency-ms 20[,50]] [--repeats 3]
        [--concurrency 8] [--crawler twisted:1] [--baseline-loop asyncio] [--new-reviews-percent 1]
        [--listing CSV | --synthetic] [--out results/crawl_economics.json]

Replaces the crawl target against a downloader that throws the bytes away (benchmarks/crawl.py,
which still measures that): at loopback nothing that stores photos comes near it, so the limits
worth a target are the CPU a stored photo costs and the requests a night makes.

Per latency (the replica, in its own process, holds every answer that long; default 20 ms), it
starts the replica with ``repeats`` x K photo reviews held back (K = ``--new-reviews-percent`` of
its photo reviews, at least 1), then ``--repeats`` rounds of:
(a) a full crawl: the whole crawl stage (``crawl.crawl_all``: the categories dealt into
    PARALLEL groups as the nightly DAG does, one Scrapy child process per group crawling its
    categories at once; validate, SeaweedFS PUT, PostgreSQL rows) into a fresh manifest and bucket, no
    delay, AutoThrottle off, ``--concurrency`` per host;
(b) asyncio doing the same storage work (``crawl.download_and_store``: aiohttp download of the
    same photos at the same concurrency, the crawler's validator and ObjectStore PUT in threads,
    group-committed manifest rows) into its own manifest and bucket;
    (a) and (b) alternate which goes first;
(c) the replica releases K held-back reviews (the newest: ~1 % new) and the crawler runs a
    second night into (a)'s manifest: the incremental night.
Reported per round and as medians: CPU seconds and ms per stored photo per process group
(crawl process: the crawl child processes plus this process; object store: SeaweedFS; database:
the private PostgreSQL server; the shop: the replica; other: the rest of the machine) for (a),
(b) and (c), and the crawler's marginal CPU per photo ((a) - (c) over their difference in
photos: the fixed cost of a night cancels out); the ratio (a)/(b) in photos/s (image phase:
first photo request to last photo row; end to end too); requests by kind as the shop counted
them (pages, JSON, photos, other = robots.txt and static files) and the night's wall time,
(c)/(a), and the night's own CPU (crawl process, object store, database, shop), (c)/(a), which
other jobs on the machine do not stretch. Targets: (a)/(b) >= 0.8 at 20 ms; (c)/(a) requests <= 5 %, time <= 10 %. Writes the
command line, the load average and every round to ``--out``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/: crawl.py, procstat.py

import sqlalchemy as sa  # noqa: E402

import crawl  # noqa: E402  (benchmarks/crawl.py)
from crawl import REPO, Bench, CpuMeter, crawl_all, replica_photos  # noqa: E402
from shoplens.config import HTTP_CLIENTS  # noqa: E402
from shoplens.manifest import engine_for  # noqa: E402
from shoplens.dev.services import (SeaweedFS, down, free_port_block,  # noqa: E402
                                   start_private_postgres, stop_pid)

TARGET_VS_ASYNCIO = 0.8
TARGET_INCREMENTAL_REQUESTS = 0.05
TARGET_INCREMENTAL_TIME = 0.10

# The replica's request kinds (its route names, crawler/replica/app.py) by what they cost.
REQUEST_KINDS = {
    "pages": ("ranks_page", "product_page"),
    "json": ("ranks_data", "reviews", "star_counts"),
    "photos": ("image",),
    "catalogue_images": ("catalogue_image",),
}
# CpuMeter's groups by process group: the crawl runs in child processes (the crawler) or in
# this process (asyncio), so both count as the crawl process.
PROCESS_GROUPS = {
    "crawl_process": ("children", "this_process"),
    "object_store": ("object_store",),
    "database": ("postgres",),
    "shop": ("replica",),
    "other": ("other",),
    "machine": ("machine",),
}


# --- the economics (pure: tested on synthetic numbers and a tiny crawl) ---------------------
def requests_by_kind(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Requests the shop counted between two snapshots of its ``requests`` counter, by kind;
    ``other`` is whatever is none of the kinds (robots.txt, static files)."""
    made = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    counts = {kind: sum(made.get(route, 0) for route in routes)
              for kind, routes in REQUEST_KINDS.items()}
    counts["other"] = sum(made.values()) - sum(counts.values())
    counts["total"] = sum(made.values())
    return counts


def cpu_by_process_group(spent_s: dict[str, float], photos: int) -> dict:
    """CPU seconds per process group and milliseconds per stored photo (None without photos)."""
    seconds = {group: sum(spent_s.get(k, 0.0) for k in keys)
               for group, keys in PROCESS_GROUPS.items()}
    return {"cpu_s": {g: round(v, 3) for g, v in seconds.items()},
            "cpu_ms_per_stored_photo": {g: round(1000 * v / photos, 2) if photos else None
                                        for g, v in seconds.items()},
            "cores_busy": round(seconds["machine"] / spent_s["wall_s"], 2)
            if spent_s.get("wall_s") else None}


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 4) if denominator else None


# The night's own work: what the crawl costs the machine, whatever else runs on it.
OWN_GROUPS = ("crawl_process", "object_store", "database", "shop")


def incremental_vs_full(full: dict, incremental: dict) -> dict:
    """An incremental night's requests (by kind and in all) and wall time over a full crawl's;
    with CPU measured, also its own CPU (``OWN_GROUPS``) over the full crawl's (``own_cpu``),
    which a loaded machine does not stretch the way it stretches a short night's wall time."""
    requests = {kind: ratio(incremental["requests_by_kind"][kind], full["requests_by_kind"][kind])
                for kind in full["requests_by_kind"]}
    time_ratio = ratio(incremental["night_s"], full["night_s"])
    own_cpu = None
    if "cpu" in full and "cpu" in incremental:
        own_cpu = ratio(sum(incremental["cpu"]["cpu_s"].get(g, 0.0) for g in OWN_GROUPS),
                        sum(full["cpu"]["cpu_s"].get(g, 0.0) for g in OWN_GROUPS))
    return {"requests": requests, "time": time_ratio, "own_cpu": own_cpu,
            "requests_target_met": requests["total"] is not None
            and requests["total"] <= TARGET_INCREMENTAL_REQUESTS,
            "time_target_met": time_ratio is not None and time_ratio <= TARGET_INCREMENTAL_TIME}


def marginal_cpu_ms_per_photo(full: dict, incremental: dict) -> dict:
    """CPU per process group that one more stored photo costs: the two nights do the same fixed
    work (process starts, ranking, product pages, first review pages), so their difference over
    the difference in photos is the per-photo part; the incremental night's CPU is then about
    the fixed cost of a night."""
    photos = full["photos"] - incremental["photos"]
    return {group: round(1000 * (seconds - incremental["cpu"]["cpu_s"][group]) / photos, 2)
            if photos > 0 else None for group, seconds in full["cpu"]["cpu_s"].items()}


def crawler_vs_asyncio(crawled: dict, storage: dict) -> dict:
    """Photos/s of the crawler (image phase, and end to end) over asyncio's doing the same
    storage work."""
    return {"image_phase": ratio(crawled["image_phase_photos_per_s"], storage["photos_per_s"]),
            "end_to_end": ratio(crawled["end_to_end_photos_per_s"], storage["photos_per_s"])}


def medians(rounds: list[dict], paths: list[tuple[str, ...]]) -> dict:
    """The median over rounds of each nested value named by a path (rounds lacking it skipped)."""
    out: dict = {}
    for path in paths:
        values = []
        for r in rounds:
            value = r
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values.append(value)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = round(statistics.median(values), 4) if values else None
    return out


def summary_paths() -> list[tuple[str, ...]]:
    paths = [("crawler_vs_asyncio", "image_phase"), ("crawler_vs_asyncio", "end_to_end"),
             ("incremental_vs_full", "time"), ("incremental_vs_full", "own_cpu"),
             ("full", "image_phase_photos_per_s"),
             ("full", "night_s"), ("incremental", "night_s"), ("incremental", "photos"),
             ("asyncio_with_storage", "photos_per_s")]
    paths += [("incremental_vs_full", "requests", k) for k in (*REQUEST_KINDS, "other", "total")]
    for side in ("full", "asyncio_with_storage", "incremental"):
        paths += [(side, "cpu", "cpu_ms_per_stored_photo", g) for g in PROCESS_GROUPS]
        paths += [(side, "cpu", "cores_busy")]
        paths += [(side, "cpu", "cpu_s", g) for g in PROCESS_GROUPS]
    paths += [("crawler_marginal_cpu_ms_per_photo", g) for g in PROCESS_GROUPS]
    return paths


# --- one night, as the shop and the machine saw it -------------------------------------------
def measured_night(settings, run_key: str, parallel: int, shop_requests, meter: CpuMeter | None,
                   cdn_counters=None) -> dict:
    """``crawl.crawl_all`` into ``settings``' manifest, with the requests the shop counted by
    kind (``shop_requests()``: its running ``requests`` counter) and, with a meter, the CPU per
    process group."""
    requests_before = shop_requests()
    cdn_before = cdn_counters() if cdn_counters else None
    cpu_before = meter.snapshot() if meter else None
    night = crawl_all(settings, parallel, run_key)
    if meter:
        night["cpu"] = cpu_by_process_group(CpuMeter.spent(cpu_before, meter.snapshot()),
                                            night["photos"])
    if cdn_counters:
        night["cdn_mean_in_flight"] = crawl._mean_in_flight(cdn_before, cdn_counters())
    night["requests_by_kind"] = requests_by_kind(requests_before, shop_requests())
    return night


def stored_urls(settings) -> set[str]:
    with engine_for(settings.manifest_url).connect() as conn:
        return {u for (u,) in conn.execute(sa.text("SELECT source_url FROM images"))}


class Economics:
    def __init__(self, args, bench: Bench, postmaster_pid: int | None):
        self.args, self.bench, self.postmaster_pid = args, bench, postmaster_pid
        self.http_client, parallel = args.crawler.split(":")
        self.parallel = int(parallel)

    def new_reviews_per_night(self, latency_ms: float) -> tuple[int, int]:
        """(photo reviews the shop has, K to release per round), from a replica with none held
        back."""
        replica, port = self.bench.start_replica(latency_ms)
        try:
            truth = json.loads(crawl._get(f"http://127.0.0.1:{port}/__replica/ground-truth.json"))
        finally:
            stop_pid(replica.pid)
        photo_reviews = sum(1 for r in truth["reviews"] if r["photo_url"])
        return photo_reviews, max(1, round(photo_reviews * self.args.new_reviews_percent / 100))

    def one_latency(self, latency_ms: float) -> dict:
        photo_reviews, per_night = self.new_reviews_per_night(latency_ms)
        replica, port = self.bench.start_replica(latency_ms,
                                                 hold_back=per_night * self.args.repeats)
        base, cdn = f"http://127.0.0.1:{port}", f"127.0.0.1:{port + 1}"

        def shop_requests() -> dict:
            return json.loads(crawl._get(f"{base}/__replica/stats"))["requests"]

        def cdn_counters() -> dict:
            return crawl._cdn_counters(base, cdn)

        meter = CpuMeter(replica.pid, self.bench.weed.pid, self.postmaster_pid)
        rounds = []
        try:
            for r in range(self.args.repeats):
                load_before = os.getloadavg()
                categories, photos = replica_photos(base)
                settings = self.bench.fresh_settings(base, cdn, categories).with_overrides(
                    http_client=self.http_client)
                order = ["crawler", "asyncio"] if r % 2 == 0 else ["asyncio", "crawler"]
                for side in order:
                    if side == "crawler":
                        full = measured_night(settings, "night-full", self.parallel,
                                              shop_requests, meter, cdn_counters)
                        full["same_urls"] = stored_urls(settings) == {p["url"] for p in photos}
                    else:
                        cdn_before = cdn_counters()
                        storage = self.bench.storage_round(base, cdn, categories, photos, meter)
                        storage["cpu"] = cpu_by_process_group(storage.pop("cpu_spent_s"),
                                                              storage["photos"])
                        storage["cdn_mean_in_flight"] = crawl._mean_in_flight(cdn_before,
                                                                              cdn_counters())
                released = json.loads(_post(f"{base}/__replica/release?n={per_night}"))["released"]
                _, photos_after = replica_photos(base)
                incremental = measured_night(settings, "night-incremental", self.parallel,
                                             shop_requests, meter, cdn_counters)
                incremental["released_reviews"] = len(released)
                incremental["same_urls"] = (stored_urls(settings)
                                            == {p["url"] for p in photos_after})
                rounds.append({
                    "round": r, "order": order,
                    "loadavg_before": [round(x, 2) for x in load_before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                    "full": full, "asyncio_with_storage": storage, "incremental": incremental,
                    "crawler_vs_asyncio": crawler_vs_asyncio(full, storage),
                    "incremental_vs_full": incremental_vs_full(full, incremental),
                    "crawler_marginal_cpu_ms_per_photo": marginal_cpu_ms_per_photo(full,
                                                                                   incremental),
                })
                print(json.dumps({"latency_ms": latency_ms, "round": r,
                                  "crawler_vs_asyncio": rounds[-1]["crawler_vs_asyncio"],
                                  "incremental_vs_full": rounds[-1]["incremental_vs_full"],
                                  "loadavg": rounds[-1]["loadavg_after"]}),
                      file=sys.stderr, flush=True)
        finally:
            stop_pid(replica.pid)
        median = medians(rounds, summary_paths())
        return {
            "latency_ms": latency_ms, "photo_reviews_in_shop": photo_reviews,
            "new_reviews_per_incremental_night": per_night, "median": median,
            "targets": {
                "crawler_vs_asyncio_image_phase": TARGET_VS_ASYNCIO,
                "met_crawler_vs_asyncio_image_phase":
                    (median["crawler_vs_asyncio"]["image_phase"] or 0) >= TARGET_VS_ASYNCIO,
                "incremental_requests": TARGET_INCREMENTAL_REQUESTS,
                "met_incremental_requests":
                    median["incremental_vs_full"]["requests"]["total"] is not None
                    and median["incremental_vs_full"]["requests"]["total"]
                    <= TARGET_INCREMENTAL_REQUESTS,
                "incremental_time": TARGET_INCREMENTAL_TIME,
                "met_incremental_time": median["incremental_vs_full"]["time"] is not None
                    and median["incremental_vs_full"]["time"] <= TARGET_INCREMENTAL_TIME,
            },
            "all_rounds_stored_exactly_the_shops_photos": all(
                x["full"]["same_urls"] and x["incremental"]["same_urls"] for x in rounds),
            "rounds": rounds,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-ms", default="20",
                        help="comma list of replica answer delays to measure at (ms)")
    parser.add_argument("--crawler", default="twisted:1",
                        help="HTTP_CLIENT:PARALLEL: the http_client setting and how many category "
                             "crawls run at once (sharing --concurrency)")
    parser.add_argument("--baseline-loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the event loop of the asyncio baseline (the crawler runs on uvloop)")
    parser.add_argument("--new-reviews-percent", type=float, default=1.0,
                        help="reviews released before each incremental night, in %% of the "
                             "shop's photo reviews")
    parser.add_argument("--listing", type=Path, default=None)
    parser.add_argument("--synthetic", action="store_true", help="use the generated photo set")
    parser.add_argument("--shared-postgres", action="store_true",
                        help="use the PostgreSQL server at $SHOPLENS_TEST_PG (its CPU is then "
                             "every PostgreSQL process's on the machine) instead of a private one")
    parser.add_argument("--store-go-procs", type=int, default=SeaweedFS.go_max_procs,
                        help="the object store's Go scheduler threads (0: one per core, Go's default; "
                             "the local stack runs %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "crawl_economics.json")
    args = parser.parse_args()
    client, _, parallel = args.crawler.partition(":")
    if client not in HTTP_CLIENTS:
        parser.error(f"--crawler {args.crawler!r}: HTTP_CLIENT is one of {HTTP_CLIENTS}")
    if not parallel.isdigit() or int(parallel) < 1 or args.concurrency % int(parallel):
        parser.error(f"--crawler {args.crawler!r}: PARALLEL must divide --concurrency")
    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]

    work = Path(tempfile.mkdtemp(prefix="shoplens-bench-economics-"))
    work.chmod(0o755)  # the private PostgreSQL runs as user postgres under it
    listing = args.listing
    shared = Path(os.environ.get("SHOPLENS_SHARED_DIR", REPO.parent / "shared"))
    grocery = shared / "datasets" / "grocery"
    if listing is None and not args.synthetic and grocery.exists():
        from crawler.replica.listings import grocery_listing, write_listing

        listing = work / "grocery.csv"
        write_listing(grocery_listing(grocery, "train"), listing)
    catalogue = f"listing {listing}" if listing else "replica generated photo set (seed 0)"

    started = time.time()
    load_start = os.getloadavg()
    # A private PostgreSQL, so that its CPU is this benchmark's alone (the shared server also
    # serves other jobs' tests).
    postmaster_pid, pg_server, pg_state = None, crawl.PG_SERVER, work / "postgres"
    if not args.shared_postgres:
        pg_port = free_port_block(1)
        postmaster_pid = start_private_postgres(pg_state, pg_port)
        pg_server = f"postgresql+psycopg2://postgres@127.0.0.1:{pg_port}"
    bench = Bench(args, work, listing, pg_server)
    try:
        bench.weed.start()
        by_latency = [Economics(args, bench, postmaster_pid).one_latency(latency)
                      for latency in latencies]
    finally:
        bench.weed.stop()
        bench.drop_databases()
        if postmaster_pid:
            down(pg_state)
        shutil.rmtree(work, ignore_errors=True)  # the store's and the database's files: ~0.5 GB
    result = {
        "command": [Path(sys.executable).name, *sys.argv],
        "catalogue": catalogue, "concurrency_per_host": args.concurrency,
        "crawler": args.crawler, "baseline_loop": args.baseline_loop, "repeats": args.repeats,
        "postgres": "shared server" if args.shared_postgres else "private server",
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(started)),
        "wall_s": round(time.time() - started, 1),
        "machine": {"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load_start],
                    "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
        "summary": [{k: v for k, v in b.items() if k != "rounds"} for b in by_latency],
        "by_latency": by_latency,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(json.dumps(result["summary"], indent=2, ensure_ascii=False))
    return 0


def _post(url: str) -> str:
    import urllib.request

    req = urllib.request.Request(url, data=b"", method="POST", headers={"X-Replica-Admin": "1"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return resp.read().decode()


if __name__ == "__main__":
    raise SystemExit(main())

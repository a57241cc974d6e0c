"""Where the crawler's CPU goes, and A/B of crawler versions (a profiling aid, not the ratio benchmark).

Starts SeaweedFS and the replica (grocery train listing, needs ../shared) once, then for each round
runs ``python -m crawler crawl`` per category for each variant (``NAME:DIR``, DIR a checkout whose
``crawler/`` is used; order alternates per round) and prints one JSON line per variant and round:
image-phase photos/s, the plain aiohttp downloader's photos/s in the same round, and CPU per photo
per thread (from /proc, via benchmarks/crawl_cpu_child.py). ``--profile`` writes cProfile files
instead; ``--spy`` records with py-spy (when installed).

  .venv/bin/python benchmarks/crawl_cpu.py --latency-ms 20 --rounds 2 --variants old:/path/to/old,new:.
"""
import argparse, asyncio, json, os, shutil, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import crawl as B
import crawler
from crawler.run import settings_env, PACKAGE_ROOT

p = argparse.ArgumentParser()
p.add_argument("--latency-ms", type=float, default=0)
p.add_argument("--profile", action="store_true")
p.add_argument("--spy", action="store_true")
p.add_argument("--variants", default=f"current:{ROOT}")
p.add_argument("--rounds", type=int, default=1)
p.add_argument("--categories", type=int, default=6)
a = p.parse_args()
GROCERY = ROOT.parent / "shared" / "datasets" / "grocery"
if not GROCERY.is_dir():
    sys.exit("needs ../shared/datasets/grocery (absent on this machine)")
class Args: concurrency = 8; repeats = 1
work = Path(tempfile.mkdtemp(prefix="prof-"))
from crawler.replica.listings import grocery_listing, write_listing
listing = work / "g.csv"; write_listing(grocery_listing(GROCERY, "train"), listing)
bench = B.Bench(Args, work, listing)
bench.weed.start()
replica, port = bench.start_replica(a.latency_ms)
try:
    base, cdn = f"http://127.0.0.1:{port}", f"127.0.0.1:{port+1}"
    cats, photos = B.replica_photos(base)
    cats = cats[: a.categories]
    urls = [p["url"] for p in photos]
    for rnd in range(a.rounds):
        plain = asyncio.run(B.plain_download(urls, 8))
        variants = [v.split(":") for v in a.variants.split(",")]
        if rnd % 2: variants = variants[::-1]
        for vname, vpath in variants:
            settings = bench.fresh_settings(base, cdn, cats)
            crawler.start_run(settings, "bench")
            threads = {}; tot_ph = 0; tot_img = 0; t0 = time.perf_counter(); cpu = 0
            for cid in cats:
                env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(Path(vpath).resolve())}
                sf = work / f"stats-{cid}.json"
                cmd = [sys.executable]
                if a.spy:
                    cmd = [shutil.which("py-spy") or "py-spy", "record", "--threads", "--format", "raw", "-r", "250", "-o", str(work / f"spy-{cid}.txt"), "--", sys.executable]
                if a.profile:
                    cmd += ["-m", "cProfile", "-o", str(work / f"prof-{cid}.out")]
                    cmd += ["-m", "crawler", "crawl", "--category", cid, "--run-key", "bench", "--stats-file", str(sf)]
                else:
                    env["CPU_REPORT"] = str(work / f"cpu-{cid}.json")
                    if os.environ.get("CPROF_DIR"): env["CPROF"] = f"{os.environ['CPROF_DIR']}/{vname}-{cid}.prof"
                    cmd += [str(Path(__file__).with_name("crawl_cpu_child.py")), "crawl", "--category", cid, "--run-key", "bench", "--stats-file", str(sf)]
                r0 = os.times()
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / f"log-{cid}.txt", "w"), check=True)
                r1 = os.times()
                cpu += (r1.children_user - r0.children_user) + (r1.children_system - r0.children_system)
                s = json.loads(sf.read_text())
                s = s[0] if isinstance(s, list) else s  # the stats file lists its categories
                if not a.profile and not a.spy:
                    c = json.loads((work / f"cpu-{cid}.json").read_text())
                    for k, v in c.items(): threads[k] = threads.get(k, 0) + v
                tot_ph += s["photos_stored"]; tot_img += s["image_phase_s"] or 0
            wall = time.perf_counter() - t0
            print(json.dumps({"variant": vname, "round": rnd, "photos": tot_ph, "image_phase_pps": round(tot_ph / tot_img, 1),
                              "e2e_pps": round(tot_ph / wall, 1), "plain_pps": plain["photos_per_s"],
                              "ratio": round(tot_ph / tot_img / plain["photos_per_s"], 3),
                              "child_cpu_s": round(cpu, 2), "cpu_ms_per_photo": round(1000 * cpu / tot_ph, 2),
                              "load": os.getloadavg()[0], "threads": threads, "ms_per_photo": {k: round(1000*v/tot_ph, 2) for k, v in threads.items()}}), flush=True)
    print("work", work)
finally:
    B.stop_pid(replica.pid); bench.weed.stop(); bench.drop_databases()

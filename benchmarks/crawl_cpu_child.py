"""Child of benchmarks/crawl_cpu.py: ``python -m crawler`` plus a per-thread CPU report on exit."""
import os, sys, threading, json, resource, collections, re, atexit
sys.argv = ["crawler"] + sys.argv[1:]
from crawler.__main__ import main
from procstat import cpu_seconds
def report():
    names = {t.native_id: re.sub(r"_\d+$", "", t.name) for t in threading.enumerate()}
    per = collections.Counter()
    for tid in os.listdir("/proc/self/task"):
        cpu = cpu_seconds(f"/proc/self/task/{tid}/stat")
        if cpu is not None:
            per[names.get(int(tid), "exited")] += cpu[0]
    ru = resource.getrusage(resource.RUSAGE_SELF)
    per["TOTAL"] = ru.ru_utime + ru.ru_stime
    per["main_before_photos"] = marks.get("first", 0)
    per["workers"] = marks.get("workers", 0)
    per["main_image_phase"] = marks.get("last", 0) - marks.get("first", 0)
    per["proc_image_phase"] = marks.get("last_proc", 0) - marks.get("first_proc", 0)
    with open(os.environ["CPU_REPORT"], "w") as fh:
        json.dump({k: round(v, 2) for k, v in per.items()}, fh)
import time
from crawler.spiders import reviews as R
marks = {}
orig = R.ReviewsSpider._photo_request
def patched(self, *a, **k):
    if "first" not in marks:
        marks["first"] = time.thread_time(); marks["first_proc"] = time.process_time()
        if os.environ.get("CPROF"):
            import cProfile; marks["prof"] = cProfile.Profile(time.thread_time); marks["prof"].enable()
    return orig(self, *a, **k)
R.ReviewsSpider._photo_request = patched
from crawler import pipelines as P
orig_close = P.ReviewPhotoPipeline.close_spider
def close(self):
    marks["last"] = time.thread_time(); marks["last_proc"] = time.process_time()
    w = 0
    for task in os.listdir("/proc/self/task"):
        try:
            kids = open(f"/proc/self/task/{task}/children").read().split()
        except OSError:
            continue
        w += sum(c[0] for c in (cpu_seconds(f"/proc/{k}/stat") for k in kids) if c is not None)
    marks["workers"] = w
    if "prof" in marks:
        marks["prof"].disable(); marks["prof"].dump_stats(os.environ["CPROF"])
    return orig_close(self)
P.ReviewPhotoPipeline.close_spider = close
rc = main()
report()
sys.exit(rc)

"""CPU seconds from /proc, for the crawl benchmarks (no imports beyond the standard library, so
the crawl child of benchmarks/crawl_cpu.py can use it under any checkout's PYTHONPATH)."""
import os

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(stat_path: str) -> tuple[float, float] | None:
    """(user + system, of its ended children) CPU seconds of the task or process whose
    /proc stat file this is; None once it is gone."""
    try:
        with open(stat_path) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / TICK, (cutime + cstime) / TICK


def machine_busy_seconds() -> float:
    """Core-seconds the whole machine spent not idle since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / TICK

"""Radius search among 1,000,000 64-bit hashes: compiled multi-index hashing vs a numpy brute force.

One run, same machine, same data, same queries. Every comparison checks that the index and the
brute force return the same result set. Timings are medians of ``--repeats`` rounds in which the
brute force and the index run alternately (the machine is shared and its load drifts), and the
speed-up is median brute force / median index; the range of the per-round ratios shows how
reliable it is.

1. ``by_radius``: radius-r search, r = 6, 8, 10, 12, chunk count chosen by the cost model for a
   kept index; the query alone (index built once and kept) and with its build (an index built for
   these queries only).
2. ``chunk_sweep``: r = 12 with 4..7 chunks (refined pigeonhole radii), query alone.
3. ``stage_search``: the stage's own search, ``find_pairs`` (pHash + dHash <= threshold, so a
   radius-12 search on each hash; compiled scan or index chosen by the cost model, everything
   included) for a few new images among 1 M stored ones, against a numpy brute force of the same
   rule. Both candidate methods are also timed on the same search, to check the model's choice.
4. ``compile``: numba's import and JIT compile time of the kernels in a fresh process with an
   empty cache, and the time to load them from that cache in another fresh process (what every
   later run pays), reported apart from the search timings (which run after a warm-up).
5. ``baseline_shape``: the numpy brute force with its default block (a few queries x 16 K items
   into reused buffers) against one query x all items per step (the previous baseline), to show
   the baseline was not weakened.
6. ``cost_constants``: the cost model's constants fitted to this run (chunk sweep: time per query
   = probes x probe cost + candidates x candidate cost, least squares; the index build; the
   compiled scan), relative to one candidate check, next to the ones the code uses.

Data (labelled ``uniform_random`` in the report): uniform random 64-bit hashes plus planted near-
copies (a tenth of the items are copies of others with a few bits flipped), so queries have real
neighbours. Uniform bits are the worst case for radius search (no structure to exploit) and the
best case for bucket balance.

    .venv/bin/python benchmarks/dedup.py [--items 1000000] [--queries 500] [--repeats 7] [--out results/dedup.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.dedup import hamming_index  # noqa: E402
from dataset.dedup.clusters import DuplicateRule, find_pairs  # noqa: E402
from dataset.dedup.hamming_index import (HammingIndex, brute_force_neighbours, expected_work,  # noqa: E402
                                   scan_neighbours)
from shoplens.config import Settings  # noqa: E402


def random_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 2**63, count, dtype=np.int64).view(np.uint64) ^ (
        rng.integers(0, 2, count).astype(np.uint64) << np.uint64(63))


def flip_masks(rng: np.random.Generator, flip_counts: np.ndarray) -> np.ndarray:
    """One 64-bit mask per entry with exactly that many distinct random bits set."""
    ranks = np.argsort(rng.random((len(flip_counts), 64)), axis=1)  # a random bit order per mask
    chosen = ranks < flip_counts[:, None]
    return (chosen.astype(np.uint64) << np.arange(64, dtype=np.uint64)).sum(axis=1, dtype=np.uint64)


def planted(rng: np.random.Generator, count: int, max_flips: int) -> np.ndarray:
    """``count`` hashes, a tenth of which are near-copies of others (0..max_flips bits flipped)."""
    copies = count // 10
    hashes = random_hashes(rng, count)
    sources = rng.integers(0, count - copies, copies)
    hashes[count - copies:] = hashes[sources] ^ flip_masks(rng, rng.integers(0, max_flips + 1, copies))
    return hashes


def planted_pairs(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(pHash, dHash) for ``count`` images, a tenth near-copies with 0..16 bits flipped in each hash."""
    copies = count // 10
    phash, dhash = random_hashes(rng, count), random_hashes(rng, count)
    sources = rng.integers(0, count - copies, copies)
    phash[count - copies:] = phash[sources] ^ flip_masks(rng, rng.integers(0, 17, copies))
    dhash[count - copies:] = dhash[sources] ^ flip_masks(rng, rng.integers(0, 17, copies))
    return phash, dhash


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def alternate(runs: dict, repeats: int) -> tuple[dict, dict]:
    """Each named run once per round, in turn, ``repeats`` rounds: (last results, seconds per round)."""
    results, seconds = {}, {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name], spent = timed(fn)
            seconds[name].append(spent)
    return results, seconds


def median(values) -> float:
    return statistics.median(values)


def round_ratios(numerators, denominators) -> list[float]:
    return [round(a / b, 1) for a, b in zip(numerators, denominators)]


def brute_force_rule(phash, dhash, positions, rule: DuplicateRule, queries_per_step: int = 4,
                     items_per_step: int = 65_536) -> set:
    """Every pair (low, high, p + d) the rule accepts between ``positions`` and all items: full scans
    of both hashes, a block of queries x items at a time (numpy, like ``brute_force_neighbours``)."""
    found = set()
    for start in range(0, len(positions), queries_per_step):
        rows = positions[start:start + queries_per_step]
        for first in range(0, len(phash), items_per_step):
            p = np.bitwise_count(phash[rows, None] ^ phash[None, first:first + items_per_step])
            d = np.bitwise_count(dhash[rows, None] ^ dhash[None, first:first + items_per_step])
            q, item = np.nonzero(rule.matches(p, d))
            if len(q) == 0:
                continue
            total = p[q, item].astype(np.int64) + d[q, item]
            query, item = rows[q], item + first
            keep = query != item
            low, high = np.minimum(query, item)[keep], np.maximum(query, item)[keep]
            found.update(zip(low.tolist(), high.tolist(), total[keep].tolist()))
    return found


def compare_radius(hashes, queries, radius: int, repeats: int, chunk_count: int | None = None) -> dict:
    built = {}

    def build():
        built["index"] = HammingIndex(hashes, radius, chunk_count=chunk_count)

    results, seconds = alternate({"brute force": lambda: brute_force_neighbours(hashes, queries, radius),
                                  "build": build, "query": lambda: built["index"].query(queries)}, repeats)
    index = built["index"]
    brute_s, build_s, query_s = (median(seconds[k]) for k in ("brute force", "build", "query"))
    probes, candidates = expected_work(len(hashes), radius, len(index.chunks))
    return {"radius": radius, "chunks": len(index.chunks),
            "chunk_radii": hamming_index.chunk_radii(radius, len(index.chunks)),
            "probes_per_query": probes, "expected_candidates_per_query": round(candidates),
            "pairs_found": len(results["query"]),
            "same_result": results["query"].as_set() == results["brute force"].as_set(),
            "repeats": repeats, "index_build_s": round(build_s, 4), "index_query_s": round(query_s, 4),
            "brute_force_s": round(brute_s, 3), "speedup_query": round(brute_s / query_s, 1),
            "speedup_query_per_round": round_ratios(seconds["brute force"], seconds["query"]),
            "speedup_with_build": round(brute_s / (build_s + query_s), 1)}


def chunk_sweep(hashes, queries, radius: int, chunk_counts: list[int], repeats: int) -> list[dict]:
    indexes = {m: HammingIndex(hashes, radius, chunk_count=m) for m in chunk_counts}
    expected = brute_force_neighbours(hashes, queries, radius).as_set()
    results, seconds = alternate({m: (lambda ix=ix: ix.query(queries)) for m, ix in indexes.items()}, repeats)
    rows = []
    for m in chunk_counts:
        probes, candidates = expected_work(len(hashes), radius, m)
        rows.append({"radius": radius, "chunks": m, "chunk_radii": hamming_index.chunk_radii(radius, m),
                     "probes_per_query": probes, "expected_candidates_per_query": round(candidates),
                     "same_result": results[m].as_set() == expected, "index_query_s": round(median(seconds[m]), 4),
                     "chosen_by_cost_model": m == hamming_index.choose_chunk_count(len(hashes), radius)})
    return rows


def stage_search(rng, phash, dhash, rule: DuplicateRule, query_count: int, repeats: int) -> dict:
    positions = np.sort(rng.choice(len(phash), query_count, replace=False))
    radius = rule.index_radius
    one_off_chunks = hamming_index.choose_chunk_count(len(phash), radius, query_count)
    results, seconds = alternate({
        "brute force": lambda: brute_force_rule(phash, dhash, positions, rule),
        "find_pairs": lambda: find_pairs(phash, dhash, rule, positions),
        # The two methods the cost model chooses between, each on both hashes.
        "scan": lambda: [scan_neighbours(h, h[positions], radius) for h in (phash, dhash)],
        "index": lambda: [HammingIndex(h, radius, one_off_chunks).query(h[positions]) for h in (phash, dhash)],
    }, repeats)
    pairs = results["find_pairs"]
    found = set(zip(pairs.first.tolist(), pairs.second.tolist(), pairs.distance.tolist()))
    brute_s, stage_s = median(seconds["brute force"]), median(seconds["find_pairs"])
    scan_s, index_s = median(seconds["scan"]), median(seconds["index"])
    chosen = hamming_index.cheapest_method(len(phash), query_count, radius)
    return {"rule": rule.describe(), "index_radius": radius, "new_images": query_count,
            "method": chosen, "method_faster_here": "scan" if scan_s < index_s else "index",
            "scan_s": round(scan_s, 4), "index_with_build_s": round(index_s, 4),
            "pairs_found": len(found), "same_result": found == results["brute force"],
            "find_pairs_s": round(stage_s, 4), "brute_force_s": round(brute_s, 3),
            "speedup_end_to_end": round(brute_s / stage_s, 1),
            "speedup_per_round": round_ratios(seconds["brute force"], seconds["find_pairs"])}


COMPILE_PROBE = """
import json, sys, time
started = time.perf_counter()
sys.path.insert(0, {repo!r})
import numba
imported = time.perf_counter()
from dataset.dedup import hamming_index
hamming_index.warm_up()
print(json.dumps({{"import_numba_s": imported - started, "kernels_s": time.perf_counter() - imported}}))
"""


def compile_times() -> dict:
    """Import + JIT compile with an empty numba cache, then import + load from that cache, each in
    a fresh interpreter (the search timings elsewhere run after a warm-up)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = []
        for _ in ("cold", "cached"):
            out = subprocess.run([sys.executable, "-c", COMPILE_PROBE.format(repo=str(REPO))], env=env,
                                 capture_output=True, text=True, check=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
    cold, cached = runs
    return {"import_numba_s": round(cold["import_numba_s"], 3), "jit_compile_s": round(cold["kernels_s"], 3),
            "load_from_cache_s": round(cached["kernels_s"], 3),
            "import_numba_second_process_s": round(cached["import_numba_s"], 3)}


def baseline_shape(hashes, queries, radius: int, repeats: int) -> dict:
    shapes = {"default": {}, "one query x all items": {"queries_per_step": 1, "items_per_step": len(hashes)}}
    results, seconds = alternate({name: (lambda kw=kw: brute_force_neighbours(hashes, queries, radius, **kw))
                                  for name, kw in shapes.items()}, repeats)
    return {"radius": radius, "queries": len(queries),
            "default_block": [hamming_index.BRUTE_FORCE_QUERIES_PER_STEP, hamming_index.BRUTE_FORCE_ITEMS_PER_STEP],
            "same_result": results["default"].as_set() == results["one query x all items"].as_set(),
            **{f"{name}_s": round(median(seconds[name]), 3) for name in shapes}}


def cost_constants(rng, hashes, queries, sweep: list[dict], repeats: int) -> dict:
    """Seconds per elementary step, and each relative to one candidate check."""
    per_query = np.array([row["index_query_s"] / len(queries) for row in sweep])
    work = np.array([[row["probes_per_query"], row["expected_candidates_per_query"]] for row in sweep], float)
    (probe_s, candidate_s), *_ = np.linalg.lstsq(work, per_query, rcond=None)
    chunks = hamming_index.choose_chunk_count(len(hashes), 12)
    probed = sum(1 for flips in hamming_index.chunk_radii(12, chunks) if flips >= 0)
    _, seconds = alternate({"build": lambda: HammingIndex(hashes, 12, chunk_count=chunks),
                            "scan": lambda: scan_neighbours(hashes, queries[:20], 12)}, repeats)
    per = {"candidate": candidate_s, "probe": probe_s,
           "build_per_item_and_chunk": median(seconds["build"]) / (len(hashes) * probed),
           "scan_per_pair": median(seconds["scan"]) / (20 * len(hashes))}
    in_code = {"candidate": hamming_index.CANDIDATE_COST, "probe": hamming_index.PROBE_COST,
               "build_per_item_and_chunk": hamming_index.BUILD_COST_PER_ITEM_AND_CHUNK,
               "scan_per_pair": hamming_index.SCAN_COST_PER_PAIR}
    return {"seconds": {k: float(f"{v:.3g}") for k, v in per.items()},
            "relative_to_candidate": {k: round(v / per["candidate"], 2) for k, v in per.items()},
            "relative_in_code": in_code}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7, help="alternating rounds per comparison (medians)")
    parser.add_argument("--radii", default="6,8,10,12")
    parser.add_argument("--sweep-chunks", default="4,5,6,7", help="chunk counts tried at radius 12")
    parser.add_argument("--stage-new-images", default="5,50,500")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "dedup.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2026)
    settings = Settings()
    report = {"command": "python benchmarks/dedup.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "data": "uniform_random (+10% planted near-copies)", "items": args.items, "queries": args.queries,
              "repeats": args.repeats, "cpu_count": os.cpu_count(), "by_radius": [], "chunk_sweep": [],
              "stage_search": []}
    ok = True

    def record(section: str, row: dict) -> None:
        nonlocal ok
        print(section, json.dumps(row), flush=True)
        report[section].append(row)
        ok = ok and row["same_result"]

    report["compile"] = compile_times()
    print("compile", json.dumps(report["compile"]), flush=True)
    hamming_index.warm_up()
    for radius in (int(r) for r in args.radii.split(",") if r):
        hashes = planted(rng, args.items, radius)
        queries = hashes[rng.choice(args.items, args.queries, replace=False)]
        record("by_radius", compare_radius(hashes, queries, radius, args.repeats))
        if radius == 12:
            for row in chunk_sweep(hashes, queries, radius, [int(m) for m in args.sweep_chunks.split(",")],
                                   args.repeats):
                record("chunk_sweep", row)
            report["baseline_shape"] = baseline_shape(hashes, queries[:100], radius, args.repeats)
            print("baseline_shape", json.dumps(report["baseline_shape"]), flush=True)
            ok = ok and report["baseline_shape"]["same_result"]
            report["cost_constants"] = cost_constants(rng, hashes, queries, report["chunk_sweep"], args.repeats)
            print("cost_constants", json.dumps(report["cost_constants"]), flush=True)

    phash, dhash = planted_pairs(rng, args.items)
    rule = DuplicateRule(settings.dedup_threshold)
    for count in (int(n) for n in args.stage_new_images.split(",") if n):
        record("stage_search", stage_search(rng, phash, dhash, rule, count, args.repeats))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not ok:
        print("index and brute force disagree somewhere (same_result false)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

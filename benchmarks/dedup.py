"""Radius search among 1,000,000 64-bit hashes: multi-index hashing vs a numpy brute force.

One run, same machine, same data, same queries: for each radius the index (dataset.hamming_index)
and a vectorised brute force (XOR + popcount of every query against every hash) must return the
same set of (query, item, distance) triples; the speed-up is brute-force time / index time, with
and without the index build. Also measured: the stage's own search (pHash + dHash <= threshold,
candidates from a radius threshold // 2 index on each hash) against a brute force of the same rule.

Data: uniform random 64-bit hashes plus planted near-copies (a tenth of the items get copies
with 0..radius bits flipped), so every query has real neighbours. Uniform bits are the best case
for chunk tables (even buckets); real pHashes are less even.

    .venv/bin/python benchmarks/dedup.py [--items 1000000] [--queries 500] [--out results/dedup.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.dedup_clusters import DuplicateRule, find_pairs  # noqa: E402
from dataset.hamming_index import HammingIndex, brute_force_neighbours  # noqa: E402
from shoplens.config import Settings  # noqa: E402


def random_hashes(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 2**63, count, dtype=np.int64).view(np.uint64) ^ (
        rng.integers(0, 2, count).astype(np.uint64) << np.uint64(63))


def planted(rng: np.random.Generator, count: int, max_flips: int) -> np.ndarray:
    """``count`` hashes, a tenth of which are near-copies of others (0..max_flips bits flipped)."""
    copies = count // 10
    hashes = random_hashes(rng, count)
    sources = rng.integers(0, count - copies, copies)
    flips = np.zeros(copies, dtype=np.uint64)
    for k, n in enumerate(rng.integers(0, max_flips + 1, copies)):
        for bit in rng.choice(64, size=n, replace=False):
            flips[k] |= np.uint64(1) << np.uint64(int(bit))
    hashes[count - copies:] = hashes[sources] ^ flips
    return hashes


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - started


def brute_force_rule(phash, dhash, queries, threshold):
    found = set()
    for q in queries:
        distance = np.bitwise_count(phash[q] ^ phash) + np.bitwise_count(dhash[q] ^ dhash)
        for item in np.flatnonzero(distance <= threshold):
            if item != q:
                found.add((min(int(q), int(item)), max(int(q), int(item)), int(distance[item])))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--radii", default="6,8,10,12")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "dedup.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2026)
    threshold = Settings().dedup_threshold
    report = {"command": "python benchmarks/dedup.py", "items": args.items, "queries": args.queries,
              "by_radius": []}

    for radius in (int(r) for r in args.radii.split(",")):
        hashes = planted(rng, args.items, radius)
        queries = hashes[rng.choice(args.items, args.queries, replace=False)]
        index, build_s = timed(lambda: HammingIndex(hashes, radius))
        found, query_s = timed(lambda: index.query(queries))
        expected, brute_s = timed(lambda: brute_force_neighbours(hashes, queries, radius))
        same = found.as_set() == expected.as_set()
        row = {"radius": radius, "chunks": len(index.chunks), "pairs_found": len(found), "same_result": same,
               "index_build_s": round(build_s, 3), "index_query_s": round(query_s, 3),
               "brute_force_s": round(brute_s, 3), "speedup_query": round(brute_s / query_s, 1),
               "speedup_with_build": round(brute_s / (build_s + query_s), 1)}
        print(json.dumps(row))
        report["by_radius"].append(row)
        if not same:
            print(f"index and brute force disagree at radius {radius}", file=sys.stderr)
            return 1

    # The stage's search: new images against every stored (pHash, dHash).
    phash, dhash = planted(rng, args.items, threshold // 2), planted(rng, args.items, threshold // 2)
    dhash[-args.items // 10:] = phash[-args.items // 10:] ^ (dhash[-args.items // 10:] & np.uint64(0xFF))
    positions = rng.choice(args.items, args.queries, replace=False)
    rule = DuplicateRule(threshold)
    pairs, stage_s = timed(lambda: find_pairs(phash, dhash, rule, positions))
    expected_pairs, stage_brute_s = timed(lambda: brute_force_rule(phash, dhash, positions, threshold))
    found_pairs = set(zip(pairs.first.tolist(), pairs.second.tolist(), pairs.distance.tolist()))
    report["stage_search"] = {
        "rule": f"phash + dhash <= {threshold}", "index_radius": rule.index_radius,
        "pairs_found": len(found_pairs), "same_result": found_pairs == expected_pairs,
        "index_s_with_build": round(stage_s, 3), "brute_force_s": round(stage_brute_s, 3),
        "speedup_with_build": round(stage_brute_s / stage_s, 1)}
    print(json.dumps(report["stage_search"]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0 if report["stage_search"]["same_result"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

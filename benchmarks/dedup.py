"""Radius search among 1,000,000 64-bit hashes: multi-index hashing vs a numpy brute force.

One run, same machine, same data, same queries. Every comparison checks that the index and the
brute force return the same result set, and reports brute-force time / index time, for the query
alone (index built once and kept) and including the build (index built for these queries only).

1. ``by_radius``: radius-r search, r = 6, 8, 10, 12, chunk count chosen by the cost model; the
   prebuilt index (query alone, and with its build) and the probe scan (a one-off search that
   builds no item tables) against the brute force.
2. ``chunk_sweep``: r = 12 with 3..6 chunks (refined pigeonhole radii), to show that no chunk
   count makes radius 12 of 64 bits cheap on evenly spread hashes.
3. ``stage_search``: the stage's own search, ``find_pairs`` (pHash + dHash <= threshold and
   min(pHash, dHash) <= candidate radius; brute force, probe scan or index chosen by the cost
   model, everything included)
   for a few new images among 1 M stored ones, against a vectorised brute force of the same rule,
   (the rule's index radius is threshold // 2 = 12).
4. ``cost_constants``: the per-operation costs the cost model uses, measured on this machine.

Data (labelled ``uniform_random`` in the report): uniform random 64-bit hashes plus planted near-
copies (a tenth of the items are copies of others with a few bits flipped), so queries have real
neighbours. Uniform bits are the worst case for radius search (no structure to exploit) and the
best case for bucket balance.

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

from dataset import hamming_index  # noqa: E402
from dataset.dedup_clusters import DuplicateRule, find_pairs  # noqa: E402
from dataset.hamming_index import (HammingIndex, brute_force_neighbours, expected_work,  # noqa: E402
                                   probe_scan_neighbours)
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


def brute_force_rule(phash, dhash, positions, rule: DuplicateRule, batch: int = 8) -> set:
    """Every pair (low, high, p + d) the rule accepts between ``positions`` and all items: full scans."""
    found = set()
    for start in range(0, len(positions), batch):
        rows = positions[start:start + batch]
        p = np.bitwise_count(phash[rows, None] ^ phash[None, :])
        d = np.bitwise_count(dhash[rows, None] ^ dhash[None, :])
        q, item = np.nonzero(rule.matches(p, d))
        total = p[q, item].astype(np.int64) + d[q, item]
        query = rows[q]
        keep = query != item
        low, high = np.minimum(query, item)[keep], np.maximum(query, item)[keep]
        found.update(zip(low.tolist(), high.tolist(), total[keep].tolist()))
    return found


def compare_radius(hashes, queries, radius: int, chunk_count: int | None = None, brute=None) -> dict:
    index, build_s = timed(lambda: HammingIndex(hashes, radius, chunk_count=chunk_count))
    found, query_s = timed(lambda: index.query(queries))
    if brute is None:
        brute = timed(lambda: brute_force_neighbours(hashes, queries, radius))
    expected, brute_s = brute
    scanned, scan_s = timed(lambda: probe_scan_neighbours(hashes, queries, radius, len(index.chunks)))
    probes, candidates = expected_work(len(hashes), radius, len(index.chunks))
    return {"radius": radius, "chunks": len(index.chunks),
            "chunk_radii": hamming_index.chunk_radii(radius, len(index.chunks)),
            "probes_per_query": probes, "expected_candidates_per_query": round(candidates),
            "pairs_found": len(found),
            "same_result": found.as_set() == expected.as_set() == scanned.as_set(),
            "index_build_s": round(build_s, 3), "index_query_s": round(query_s, 3),
            "brute_force_s": round(brute_s, 3), "speedup_query": round(brute_s / query_s, 1),
            "speedup_with_build": round(brute_s / (build_s + query_s), 1),
            "probe_scan_s": round(scan_s, 3), "speedup_probe_scan": round(brute_s / scan_s, 1)}


def cost_constants(rng: np.random.Generator, items: int) -> dict:
    """Seconds per elementary operation, and each relative to one table probe."""
    hashes = random_hashes(rng, items)
    queries = random_hashes(rng, 200)
    # Probes: tiny index (empty buckets), wide chunks and radius 2: ~740 probes, ~0 candidates each.
    few = HammingIndex(hashes[:1000], 8, chunk_count=3)
    _, probe_s = timed(lambda: few.query(queries))
    probes = len(queries) * expected_work(1000, 8, 3)[0]
    # Candidates: 8 chunks of 8 bits probed exactly (radius 7): 8 probes and ~8 * items / 256 candidates.
    crowded, build_s = timed(lambda: HammingIndex(hashes, 7, chunk_count=8))
    _, candidate_s = timed(lambda: crowded.query(queries[:20]))
    candidates = 20 * expected_work(items, 7, 8)[1]
    _, scan_s = timed(lambda: brute_force_neighbours(hashes, queries[:20], 7))
    # Probe scan: one query at radius 0 is three passes over the items; many queries over a tiny
    # item set are nearly all key handling.
    _, pass_s = timed(lambda: probe_scan_neighbours(hashes, queries[:1], 0, chunk_count=3))
    _, keys_s = timed(lambda: probe_scan_neighbours(hashes[:1000], queries, 8, chunk_count=3))
    per = {"probe": probe_s / probes, "candidate": candidate_s / candidates,
           "build_per_item_and_chunk": build_s / (items * 8),
           "pass_per_item_and_chunk": pass_s / (items * 3), "key": keys_s / probes,
           "scan_per_pair": scan_s / (20 * items)}
    return {"seconds": {k: float(f"{v:.3g}") for k, v in per.items()},
            "relative_to_probe": {k: round(v / per["probe"], 2) for k, v in per.items()}}


def stage_search(rng, phash, dhash, rule: DuplicateRule, query_count: int) -> dict:
    positions = np.sort(rng.choice(len(phash), query_count, replace=False))
    pairs, stage_s = timed(lambda: find_pairs(phash, dhash, rule, positions))
    expected, brute_s = timed(lambda: brute_force_rule(phash, dhash, positions, rule))
    found = set(zip(pairs.first.tolist(), pairs.second.tolist(), pairs.distance.tolist()))
    return {"rule": rule.describe(), "index_radius": rule.index_radius, "new_images": query_count,
            "method": hamming_index.cheapest_method(len(phash), query_count, rule.index_radius),
            "pairs_found": len(found), "same_result": found == expected,
            "find_pairs_s": round(stage_s, 3), "brute_force_s": round(brute_s, 3),
            "speedup_end_to_end": round(brute_s / stage_s, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--radii", default="6,8,10,12")
    parser.add_argument("--sweep-chunks", default="3,4,5,6", help="chunk counts tried at radius 12")
    parser.add_argument("--stage-new-images", default="5,50,500")
    parser.add_argument("--out", type=Path, default=REPO / "results" / "dedup.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2026)
    settings = Settings()
    report = {"command": "python benchmarks/dedup.py", "data": "uniform_random (+10% planted near-copies)",
              "items": args.items, "queries": args.queries, "by_radius": [], "chunk_sweep": [],
              "stage_search": []}
    ok = True

    def record(section: str, row: dict) -> None:
        nonlocal ok
        print(section, json.dumps(row), flush=True)
        report[section].append(row)
        ok = ok and row["same_result"]

    report["cost_constants"] = cost_constants(rng, args.items)
    print("cost_constants", json.dumps(report["cost_constants"]), flush=True)
    for radius in (int(r) for r in args.radii.split(",") if r):
        hashes = planted(rng, args.items, radius)
        queries = hashes[rng.choice(args.items, args.queries, replace=False)]
        brute = timed(lambda: brute_force_neighbours(hashes, queries, radius))
        record("by_radius", compare_radius(hashes, queries, radius, brute=brute))
        if radius == 12:
            for chunks in (int(m) for m in args.sweep_chunks.split(",")):
                record("chunk_sweep", compare_radius(hashes, queries, radius, chunks, brute=brute))

    phash, dhash = planted_pairs(rng, args.items)
    rule = DuplicateRule(settings.dedup_threshold)
    for count in (int(n) for n in args.stage_new_images.split(",") if n):
        record("stage_search", stage_search(rng, phash, dhash, rule, count))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}")
    if not ok:
        print("index and brute force disagree somewhere (same_result false)", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

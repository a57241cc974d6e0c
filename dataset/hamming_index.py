"""Radius search among many 64-bit hashes by multi-index hashing (Norouzi, Punjani & Fleet, 2012).

The 64 bits are cut into ``m`` disjoint chunks and each chunk gets a table from chunk value to the
items holding it. Write the radius as ``r = q * m + a`` (``0 <= a < m``): two hashes within ``r``
differ in at most ``q`` bits in one of the first ``a + 1`` chunks, or in at most ``q - 1`` bits in
one of the others (otherwise their distance would be at least ``(a + 1)(q + 1) + (m - a - 1) q =
r + 1``). So a query probes each table with every value within that chunk's radius of its own chunk
value, and the items found are checked on all 64 bits: the result is exact, the same set a brute-
force scan returns. This refined pigeonhole probes far fewer values than ``r // m`` everywhere
when ``a`` is small (e.g. r = 12, m = 5: two chunks at radius 2 and three at 1 bit).

Everything is vectorised over a batch of queries with numpy; tables are counting-sorted arrays
(``offsets[value] .. offsets[value + 1]`` in ``order``), so building one costs one sort.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dataset.hashing import HASH_BITS, as_uint64

MAX_CHUNK_BITS = 22  # a direct offsets table of 2**22 entries is 16 MiB; wider chunks would not pay
# Queries per vectorised step are limited so that the probe arrays stay near this many entries:
# bigger temporaries fall out of cache and cost more per probe than they save in numpy overhead.
PROBES_PER_STEP = 1_000_000
BRUTE_FORCE_PAIRS_PER_STEP = 1_000_000
MAX_SCAN_KEYS = 16_000_000  # probe keys the probe scan may hold per chunk (int64: 128 MB)
# Relative costs of numpy's elementary steps, in units of one table probe (measured by
# benchmarks/dedup.py, section cost_constants): a candidate checked on 64 bits, one item put into
# one chunk table (a sort), one item passed over in one chunk by the probe scan, one probe key
# sorted by the probe scan, and one (query, item) pair of the brute force. They decide the chunk
# count and which of brute force, probe scan and index is cheapest for a search.
PROBE_COST = 1.0
CANDIDATE_COST = 0.07
BUILD_COST_PER_ITEM_AND_CHUNK = 1.8
PASS_COST_PER_ITEM_AND_CHUNK = 0.18
KEY_COST = 1.2
# The probe scan checks a candidate at scattered places (the query side is not in bucket order):
# ~2.5 probes each (r = 12, 4 chunks, 500 queries, 1 M items: the chunk_sweep row of the benchmark).
SCAN_CANDIDATE_COST = 2.5
SCAN_COST_PER_PAIR = 0.06


@dataclass(frozen=True)
class Neighbours:
    """Pairs found by a search: ``query[k]`` is within ``distance[k]`` of item ``item[k]``."""
    query: np.ndarray
    item: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.query)

    def as_set(self) -> set[tuple[int, int, int]]:
        return set(zip(self.query.tolist(), self.item.tolist(), self.distance.tolist()))


def _empty() -> Neighbours:
    z = np.zeros(0, dtype=np.int64)
    return Neighbours(z, z, z)


@lru_cache(maxsize=64)
def _flip_masks(bits: int, max_flips: int) -> np.ndarray:
    """Every ``bits``-wide word with at most ``max_flips`` bits set (XOR masks for probing)."""
    masks = [0]
    for flips in range(1, max_flips + 1):
        for positions in itertools.combinations(range(bits), flips):
            masks.append(sum(1 << p for p in positions))
    masks = np.array(masks, dtype=np.int64)
    masks.setflags(write=False)
    return masks


def probe_count(bits: int, max_flips: int) -> int:
    return sum(math.comb(bits, k) for k in range(max_flips + 1))


def chunk_widths(chunk_count: int) -> list[int]:
    base, extra = divmod(HASH_BITS, chunk_count)
    return [base + 1] * extra + [base] * (chunk_count - extra)


def chunk_radii(radius: int, chunk_count: int) -> list[int]:
    """Search radius per chunk (-1: chunk not probed) such that every hash within ``radius`` is found."""
    q, a = divmod(radius, chunk_count)
    return [q if k <= a else q - 1 for k in range(chunk_count)]


def expected_work(item_count: int, radius: int, chunk_count: int) -> tuple[int, float]:
    """Table probes and expected candidates per query, for evenly spread hashes."""
    probes, candidates = 0, 0.0
    for width, flips in zip(chunk_widths(chunk_count), chunk_radii(radius, chunk_count)):
        if flips >= 0:
            count = probe_count(width, flips)
            probes += count
            candidates += count * item_count / 2 ** width
    return probes, candidates


def query_cost(item_count: int, radius: int, chunk_count: int) -> float:
    probes, candidates = expected_work(item_count, radius, chunk_count)
    return probes * PROBE_COST + candidates * CANDIDATE_COST


def choose_chunk_count(item_count: int, radius: int) -> int:
    """Chunk count with the lowest expected work per query (fewer, wider chunks: emptier buckets
    but many more probes per chunk)."""
    smallest = math.ceil(HASH_BITS / MAX_CHUNK_BITS)
    return min(range(smallest, HASH_BITS + 1), key=lambda m: query_cost(item_count, radius, m))


def search_costs(item_count: int, query_count: int, radius: int) -> dict[str, float]:
    """Expected cost of one search by each method (units of one probe; see the constants above)."""
    m = choose_chunk_count(item_count, radius)
    probes, candidates = expected_work(item_count, radius, m)
    probed_chunks = sum(1 for flips in chunk_radii(radius, m) if flips >= 0)
    verify = query_count * candidates * CANDIDATE_COST
    return {
        "brute force": query_count * item_count * SCAN_COST_PER_PAIR,
        # The probe scan holds every query's probe keys at once: only for batches of moderate size.
        "probe scan": (item_count * probed_chunks * PASS_COST_PER_ITEM_AND_CHUNK
                       + query_count * probes * KEY_COST + query_count * candidates * SCAN_CANDIDATE_COST
                       if query_count * probes <= MAX_SCAN_KEYS else math.inf),
        "index": (item_count * probed_chunks * BUILD_COST_PER_ITEM_AND_CHUNK
                  + query_count * probes * PROBE_COST + verify),
    }


def cheapest_method(item_count: int, query_count: int, radius: int) -> str:
    costs = search_costs(item_count, query_count, radius)
    return min(costs, key=costs.get)


def radius_neighbours(hashes, queries, radius: int) -> Neighbours:
    """Exact radius search by whichever of brute force, probe scan and index is expected cheapest."""
    items, probes = as_uint64(hashes), as_uint64(queries)
    method = cheapest_method(len(items), len(probes), radius)
    if method == "brute force":
        return brute_force_neighbours(items, probes, radius)
    if method == "probe scan":
        return probe_scan_neighbours(items, probes, radius)
    return HammingIndex(items, radius).query(probes)


def brute_force_neighbours(hashes, queries, radius: int, batch: int | None = None) -> Neighbours:
    """The baseline: each query against every item, vectorised with numpy (XOR + popcount).

    Queries go ``batch`` at a time (default: about a million pairs per step, which was the fastest
    on 1 M items: bigger temporaries leave the cache)."""
    items = as_uint64(hashes)
    probes = as_uint64(queries)
    batch = batch or max(1, BRUTE_FORCE_PAIRS_PER_STEP // max(len(items), 1))
    found_q, found_i, found_d = [], [], []
    for start in range(0, len(probes), batch):
        block = probes[start:start + batch]
        distances = np.bitwise_count(block[:, None] ^ items[None, :])
        q, i = np.nonzero(distances <= radius)
        found_q.append(q + start)
        found_i.append(i)
        found_d.append(distances[q, i])
    if not found_q:
        return _empty()
    return Neighbours(np.concatenate(found_q).astype(np.int64), np.concatenate(found_i).astype(np.int64),
                      np.concatenate(found_d).astype(np.int64))


def _run_positions(starts: np.ndarray, counts: np.ndarray, run_ends: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + c) for s, c in zip(starts, counts)])`` for non-empty runs, as a
    cumulative sum of steps (1 inside a run, a jump between runs): cheaper than repeat for short runs."""
    steps = np.ones(int(run_ends[-1]), dtype=np.int64)
    steps[0] = starts[0]
    steps[run_ends[:-1]] = starts[1:] - (starts[:-1] + counts[:-1] - 1)
    return np.cumsum(steps, out=steps)


def probe_scan_neighbours(hashes, queries, radius: int, chunk_count: int | None = None) -> Neighbours:
    """Exact radius search for a batch of queries without building tables over the items.

    Multi-index hashing turned around: the probe keys of all queries (each query's chunk values
    within the chunk radii) are marked in a bitmap per chunk, and every item's chunk value is
    looked up there, one pass over the items per chunk; the few items that hit are matched to
    their queries through the sorted keys and checked on all 64 bits. Cheaper than sorting the
    items into tables when the index would be used once, for a few hundred or thousand queries.
    """
    items, probes = as_uint64(hashes), as_uint64(queries)
    if not 0 <= radius <= HASH_BITS:
        raise ValueError(f"radius must be within 0..{HASH_BITS}, got {radius}")
    m = chunk_count or choose_chunk_count(len(items), radius)
    found_rows, found_items = [], []
    offset = 0
    for width, flips in zip(chunk_widths(m), chunk_radii(radius, m)):
        chunk_offset, offset = offset, offset + width
        if flips < 0 or len(probes) == 0:
            continue
        masks = _flip_masks(width, flips)
        keys = (HammingIndex._chunk_values(probes, chunk_offset, width)[:, None] ^ masks[None, :]).ravel()
        key_order = np.argsort(keys)
        sorted_keys = keys[key_order]
        marked = np.zeros(1 << width, dtype=bool)
        marked[keys] = True
        values = HammingIndex._chunk_values(items, chunk_offset, width)
        hit = np.flatnonzero(marked[values])
        if len(hit) == 0:
            continue
        lows = np.searchsorted(sorted_keys, values[hit], side="left")
        counts = np.searchsorted(sorted_keys, values[hit], side="right") - lows
        item_rows = np.repeat(hit, counts)
        shift = np.repeat(np.cumsum(counts) - counts - lows, counts)
        query_rows = key_order[np.arange(len(item_rows), dtype=np.int64) - shift] // len(masks)
        close = np.bitwise_count(probes[query_rows] ^ items[item_rows]) <= radius
        found_rows.append(query_rows[close])
        found_items.append(item_rows[close])
    if not found_rows:
        return _empty()
    n = np.int64(max(len(items), 1))
    unique = np.unique(np.concatenate(found_rows) * n + np.concatenate(found_items))
    query_rows, item_rows = np.divmod(unique, n)
    distances = np.bitwise_count(probes[query_rows] ^ items[item_rows]).astype(np.int64)
    return Neighbours(query_rows, item_rows, distances)


class HammingIndex:
    """Exact radius-``radius`` search among a fixed set of 64-bit hashes (signed or unsigned)."""

    def __init__(self, hashes, radius: int, chunk_count: int | None = None):
        if not 0 <= radius <= HASH_BITS:
            raise ValueError(f"radius must be within 0..{HASH_BITS}, got {radius}")
        self.items = as_uint64(hashes)
        self.radius = radius
        m = chunk_count or choose_chunk_count(len(self.items), radius)
        if not 1 <= m <= HASH_BITS or math.ceil(HASH_BITS / m) > MAX_CHUNK_BITS:
            raise ValueError(f"chunk_count must give chunks of 1..{MAX_CHUNK_BITS} bits, got {m}")
        self.chunks: list[tuple[int, int]] = []  # (bit offset, width)
        offset = 0
        for width in chunk_widths(m):
            self.chunks.append((offset, width))
            offset += width
        # Chunks never probed at this radius (refined pigeonhole) need no table.
        self._tables = [self._build_table(off, width) if flips >= 0 else None
                        for (off, width), flips in zip(self.chunks, chunk_radii(radius, m))]

    def __len__(self) -> int:
        return len(self.items)

    @staticmethod
    def _chunk_values(hashes: np.ndarray, offset: int, width: int) -> np.ndarray:
        return ((hashes >> np.uint64(offset)) & np.uint64((1 << width) - 1)).astype(np.int64)

    def _build_table(self, offset: int, width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(item ids in bucket order, their hashes in that order, bucket offsets) for one chunk."""
        # int32 halves the offsets (probed at random, so smaller is faster) and the sort.
        index_type = np.int32 if len(self.items) < 2**31 else np.int64
        values = self._chunk_values(self.items, offset, width).astype(np.int32)
        # numpy's stable sort of 16-bit keys is a radix sort: ~3x faster than sorting int32.
        keys = values.astype(np.uint16) if width <= 16 else values
        order = np.argsort(keys, kind="stable" if width <= 16 else None).astype(index_type)
        offsets = np.zeros((1 << width) + 1, dtype=index_type)
        np.cumsum(np.bincount(values, minlength=1 << width), out=offsets[1:])
        # Candidates are checked against this copy: a bucket is one contiguous run of it.
        return order, self.items[order], offsets

    def query(self, queries, radius: int | None = None) -> Neighbours:
        """Every (query, item) pair within ``radius`` (default: the index's radius), exactly."""
        radius = self.radius if radius is None else radius
        if not 0 <= radius <= self.radius:
            raise ValueError(f"index built for radius {self.radius}, asked for {radius}")
        probes = as_uint64(queries)
        radii = chunk_radii(radius, len(self.chunks))
        probes_per_query, candidates_per_query = expected_work(len(self.items), radius, len(self.chunks))
        step = max(1, min(4096, int(PROBES_PER_STEP // (probes_per_query + candidates_per_query))))
        parts = [self._query_batch(probes[s:s + step], s, radius) for s in range(0, len(probes), step)]
        parts = [p for p in parts if len(p)]
        if not parts:
            return _empty()
        return Neighbours(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("query", "item", "distance")))

    def _query_batch(self, block: np.ndarray, first: int, radius: int) -> Neighbours:
        found_rows, found_items = [], []
        radii = chunk_radii(radius, len(self.chunks))
        for (offset, width), table, flips in zip(self.chunks, self._tables, radii):
            if flips < 0:
                continue
            order, bucketed, offsets = table
            masks = _flip_masks(width, flips)
            keys = (self._chunk_values(block, offset, width)[:, None] ^ masks[None, :]).ravel()
            starts = offsets[keys]
            counts = offsets[keys + 1] - starts
            hit = np.flatnonzero(counts)  # most probes land in empty buckets
            if len(hit) == 0:
                continue
            starts, counts = starts[hit].astype(np.int64), counts[hit].astype(np.int64)
            run_ends = np.cumsum(counts)
            positions = _run_positions(starts, counts, run_ends)
            # Probes are grouped by query, so each query's hash repeats over one long stretch.
            per_query = np.bincount(hit // len(masks), weights=counts, minlength=len(block)).astype(np.int64)
            probe_hashes = np.repeat(block, per_query)
            close = np.flatnonzero(np.bitwise_count(probe_hashes ^ bucketed[positions]) <= radius)
            # Only the few close candidates are traced back to their query and item id.
            found_rows.append(hit[np.searchsorted(run_ends, close, side="right")] // len(masks))
            found_items.append(order[positions[close]].astype(np.int64))
        if not found_rows:
            return _empty()
        # A pair close in several chunks is found once per chunk.
        n = np.int64(max(len(self.items), 1))
        unique = np.unique(np.concatenate(found_rows) * n + np.concatenate(found_items))
        query_rows, items = np.divmod(unique, n)
        distances = np.bitwise_count(block[query_rows] ^ self.items[items]).astype(np.int64)
        return Neighbours(query_rows + first, items, distances)

    def self_join(self) -> Neighbours:
        """Every pair of distinct items ``query < item`` within the radius (items are the queries)."""
        pairs = self.query(self.items)
        keep = pairs.query < pairs.item
        return Neighbours(pairs.query[keep], pairs.item[keep], pairs.distance[keep])

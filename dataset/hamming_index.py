"""Radius search among many 64-bit hashes by multi-index hashing (Norouzi et al., CVPR 2012).

The 64 bits are cut into ``m`` disjoint chunks. Two hashes within Hamming distance ``r`` differ
in at most ``r // m`` bits in at least one chunk (pigeonhole), so the candidates of a query are the
items whose chunk ``i`` lies within ``r // m`` of the query's chunk ``i`` for some ``i``; each chunk
has a table from chunk value to the items holding it. Candidates are then checked on all 64 bits,
so the result is exact: the same set a brute-force scan returns.

Everything is vectorised over a batch of queries with numpy; tables are counting-sorted arrays
(``offsets[value] .. offsets[value + 1]`` in ``order``), so building one costs a stable sort.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from dataset.hashing import HASH_BITS, as_uint64

MAX_CHUNK_BITS = 22  # a direct offsets table of 2**22 entries is 16 MiB; wider chunks would not pay
# Queries per vectorised step are limited so that the probe arrays stay near this many entries:
# bigger temporaries fall out of cache and cost more per probe than they save in numpy overhead.
PROBES_PER_STEP = 1_000_000


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


def _flip_masks(bits: int, max_flips: int) -> np.ndarray:
    """Every ``bits``-wide word with at most ``max_flips`` bits set (XOR masks for probing)."""
    masks = [0]
    for flips in range(1, max_flips + 1):
        for positions in itertools.combinations(range(bits), flips):
            masks.append(sum(1 << p for p in positions))
    return np.array(masks, dtype=np.int64)


def _probe_count(bits: int, max_flips: int) -> int:
    return sum(math.comb(bits, k) for k in range(max_flips + 1))


def choose_chunk_count(item_count: int, radius: int) -> int:
    """Chunk count with the lowest expected work per query, assuming evenly spread hashes.

    Work = probes (table look-ups) plus candidates (64-bit checks), which cost about the same
    each (measured); fewer, wider chunks mean emptier buckets but many more probes per chunk.
    """
    best_cost, best_m = math.inf, None
    for m in range(math.ceil(HASH_BITS / MAX_CHUNK_BITS), HASH_BITS + 1):
        bits = math.ceil(HASH_BITS / m)
        probes = _probe_count(bits, radius // m)
        candidates = m * probes * item_count / 2 ** bits
        cost = m * probes + candidates
        if cost < best_cost:
            best_cost, best_m = cost, m
    return best_m


def brute_force_neighbours(hashes, queries, radius: int, batch: int = 8) -> Neighbours:
    """The baseline: each query against every item, vectorised with numpy (XOR + popcount)."""
    items = as_uint64(hashes)
    probes = as_uint64(queries)
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


class HammingIndex:
    """Exact radius-``radius`` search among a fixed set of 64-bit hashes (signed or unsigned)."""

    def __init__(self, hashes, radius: int, chunk_count: int | None = None):
        if not 0 <= radius <= HASH_BITS:
            raise ValueError(f"radius must be within 0..{HASH_BITS}, got {radius}")
        self.items = as_uint64(hashes)
        self.radius = radius
        m = chunk_count or choose_chunk_count(len(self.items), radius)
        if math.ceil(HASH_BITS / m) > MAX_CHUNK_BITS:
            raise ValueError(f"chunk_count {m} gives chunks wider than {MAX_CHUNK_BITS} bits")
        base, extra = divmod(HASH_BITS, m)
        widths = [base + 1] * extra + [base] * (m - extra)
        self.chunks: list[tuple[int, int]] = []  # (bit offset, width)
        offset = 0
        for width in widths:
            self.chunks.append((offset, width))
            offset += width
        self.flips = radius // m
        self._tables = [self._build_table(off, width) for off, width in self.chunks]
        self._masks = {w: _flip_masks(w, self.flips) for w in set(widths)}

    def __len__(self) -> int:
        return len(self.items)

    def _chunk_values(self, hashes: np.ndarray, offset: int, width: int) -> np.ndarray:
        return ((hashes >> np.uint64(offset)) & np.uint64((1 << width) - 1)).astype(np.int64)

    def _build_table(self, offset: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        values = self._chunk_values(self.items, offset, width)
        order = np.argsort(values, kind="stable")
        counts = np.bincount(values, minlength=1 << width)
        offsets = np.zeros((1 << width) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return order.astype(np.int64), offsets

    def query(self, queries, radius: int | None = None) -> Neighbours:
        """Every (query, item) pair within ``radius`` (default: the index's radius), exactly."""
        radius = self.radius if radius is None else radius
        if radius > self.radius:
            raise ValueError(f"index built for radius {self.radius}, asked for {radius}")
        probes = as_uint64(queries)
        per_query = sum(len(self._masks[w]) for _, w in self.chunks)
        step = max(1, min(4096, PROBES_PER_STEP // per_query))
        parts = [self._query_batch(probes[s:s + step], s, radius) for s in range(0, len(probes), step)]
        parts = [p for p in parts if len(p)]
        if not parts:
            return _empty()
        return Neighbours(*(np.concatenate([getattr(p, f) for p in parts])
                            for f in ("query", "item", "distance")))

    def _query_batch(self, block: np.ndarray, first: int, radius: int) -> Neighbours:
        pair_keys = []
        n = np.int64(max(len(self.items), 1))
        for (offset, width), (order, offsets) in zip(self.chunks, self._tables):
            keys = self._chunk_values(block, offset, width)[:, None] ^ self._masks[width][None, :]
            starts = offsets[keys].ravel()
            counts = offsets[keys + 1].ravel() - starts
            total = int(counts.sum())
            if total == 0:
                continue
            query_of_probe = np.repeat(np.arange(len(block), dtype=np.int64), keys.shape[1])
            query_rows = np.repeat(query_of_probe, counts)
            # Position inside ``order`` of every candidate: its bucket's start plus its rank there.
            run_starts = np.repeat(np.cumsum(counts) - counts, counts)
            positions = np.repeat(starts, counts) + (np.arange(total, dtype=np.int64) - run_starts)
            candidates = order[positions]
            close = np.bitwise_count(block[query_rows] ^ self.items[candidates]) <= radius
            pair_keys.append(query_rows[close] * n + candidates[close])
        if not pair_keys:
            return _empty()
        # A pair close in several chunks is found once per chunk.
        unique = np.unique(np.concatenate(pair_keys))
        query_rows, items = np.divmod(unique, n)
        distances = np.bitwise_count(block[query_rows] ^ self.items[items]).astype(np.int64)
        return Neighbours(query_rows + first, items, distances)

    def self_join(self) -> Neighbours:
        """Every pair of distinct items ``query < item`` within the radius (items are the queries)."""
        pairs = self.query(self.items)
        keep = pairs.query < pairs.item
        return Neighbours(pairs.query[keep], pairs.item[keep], pairs.distance[keep])

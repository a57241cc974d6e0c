"""Radius search among many 64-bit hashes by multi-index hashing (Norouzi, Punjani & Fleet, 2012).

The 64 bits are cut into ``m`` disjoint chunks and each chunk gets a table from chunk value to the
items holding it. Write the radius as ``r = q * m + a`` (``0 <= a < m``): two hashes within ``r``
differ in at most ``q`` bits in one of the first ``a + 1`` chunks, or in at most ``q - 1`` bits in
one of the others (otherwise their distance would be at least ``(a + 1)(q + 1) + (m - a - 1) q =
r + 1``). So a query probes each table with every value within that chunk's radius of its own chunk
value, and the items found are checked on all 64 bits: the result is exact, the same set a brute-
force scan returns. A pair close in several chunks is reported only from the first chunk that
finds it, so no pair appears twice.

The search is compiled with numba (``cache=True``: the JIT cost is paid once per machine). A
table is a counting sort of the items by chunk value: the items' hashes in bucket order plus a
direct offsets table of ``2**width + 1`` entries. Queries go in batches, and a batch's probe keys
are counting-sorted by bucket too, so each chunk's table is walked once, in address order, with
every probe of a bucket checked against its items while they are in cache: random jumps into the
tables (one cache miss per probe) cost ~10x a candidate check. For a few queries a plain compiled
scan is cheaper than building tables; ``radius_neighbours`` picks by a cost model.

``brute_force_neighbours`` is the numpy baseline the benchmark compares against and the tests
check every compiled path with.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

from dataset.dedup.hashing import HASH_BITS, as_uint64

MAX_CHUNK_BITS = 22  # a direct offsets table of 2**22 entries is 32 MiB; wider chunks would not pay
# The numpy baseline: this many queries x items per step, into reused buffers (64 K pairs stay in
# L2; measured ~25 % faster than one query against all 1 M items per step).
BRUTE_FORCE_QUERIES_PER_STEP = 4
BRUTE_FORCE_ITEMS_PER_STEP = 16_384
# Probes (query id + hash, 16 bytes each) one chunk of the index sorts per query batch.
PROBE_KEYS_PER_BATCH = 2_000_000
# Relative costs of the compiled steps, in units of one candidate checked on 64 bits, fitted to
# benchmarks/dedup.py (section cost_constants: r = 12 on 1 M items with 4..7 chunks, index build,
# compiled scan): one probe (sorted into its bucket, its bucket visited), one item put into one
# chunk table, and one (query, item) pair of the compiled scan. They pick the chunk count and
# whether a search scans or builds an index.
CANDIDATE_COST = 1.0
PROBE_COST = 110.0
BUILD_COST_PER_ITEM_AND_CHUNK = 25.0
BUILD_COST_PER_CHUNK_VALUE = 2.0  # the offsets table: zeroed, counted into, summed
SCAN_COST_PER_PAIR = 1.2

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


def _sorted_neighbours(query: np.ndarray, item: np.ndarray, distance: np.ndarray) -> Neighbours:
    """Pairs in (query, item) order, as the brute force lists them."""
    order = np.lexsort((item, query))
    return Neighbours(query[order], item[order], distance[order])


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


def build_cost(item_count: int, radius: int, chunk_count: int) -> float:
    return sum(item_count * BUILD_COST_PER_ITEM_AND_CHUNK + 2 ** width * BUILD_COST_PER_CHUNK_VALUE
               for width, flips in zip(chunk_widths(chunk_count), chunk_radii(radius, chunk_count)) if flips >= 0)


def choose_chunk_count(item_count: int, radius: int, query_count: int | None = None) -> int:
    """Chunk count with the lowest expected work (fewer, wider chunks: emptier buckets but many
    more probes per chunk). Given ``query_count``, a table's build counts too (a one-off search);
    without it, only the work per query (an index kept for many queries)."""
    smallest = math.ceil(HASH_BITS / MAX_CHUNK_BITS)

    def cost(m: int) -> float:
        per_query = query_cost(item_count, radius, m)
        return per_query if query_count is None else build_cost(item_count, radius, m) + query_count * per_query
    return min(range(smallest, HASH_BITS + 1), key=cost)


def search_costs(item_count: int, query_count: int, radius: int) -> dict[str, float]:
    """Expected cost of a one-off search by each method (units of one candidate check)."""
    m = choose_chunk_count(item_count, radius, query_count)
    return {"scan": query_count * item_count * SCAN_COST_PER_PAIR,
            "index": build_cost(item_count, radius, m) + query_count * query_cost(item_count, radius, m)}


def cheapest_method(item_count: int, query_count: int, radius: int) -> str:
    costs = search_costs(item_count, query_count, radius)
    return min(costs, key=costs.get)


def radius_neighbours(hashes, queries, radius: int) -> Neighbours:
    """Exact radius search by whichever of the compiled scan and the index is expected cheapest."""
    items, probes = as_uint64(hashes), as_uint64(queries)
    if cheapest_method(len(items), len(probes), radius) == "scan":
        return scan_neighbours(items, probes, radius)
    return HammingIndex(items, radius, choose_chunk_count(len(items), radius, len(probes))).query(probes)


def _check_radius(radius: int) -> None:
    if not 0 <= radius <= HASH_BITS:
        raise ValueError(f"radius must be within 0..{HASH_BITS}, got {radius}")


def brute_force_neighbours(hashes, queries, radius: int, queries_per_step: int = BRUTE_FORCE_QUERIES_PER_STEP,
                           items_per_step: int = BRUTE_FORCE_ITEMS_PER_STEP) -> Neighbours:
    """The baseline: each query against every item, vectorised with numpy (XOR + popcount).

    A block of queries x items per step, written into buffers allocated once: small enough to
    stay in cache, large enough that numpy's per-call overhead is a few percent."""
    items = as_uint64(hashes)
    probes = as_uint64(queries)
    qb, ib = max(1, min(queries_per_step, len(probes))), max(1, min(items_per_step, len(items)))
    xor, counts, close = np.empty((qb, ib), np.uint64), np.empty((qb, ib), np.uint8), np.empty((qb, ib), bool)
    found_q, found_i, found_d = [], [], []
    for start in range(0, len(probes), qb):
        block = probes[start:start + qb, None]
        for first_item in range(0, len(items), ib):
            part = items[None, first_item:first_item + ib]
            shape = (block.shape[0], part.shape[1])
            x, c, hit = xor[:shape[0], :shape[1]], counts[:shape[0], :shape[1]], close[:shape[0], :shape[1]]
            np.bitwise_xor(block, part, out=x)
            np.bitwise_count(x, out=c)
            np.less_equal(c, radius, out=hit)
            q, i = np.nonzero(hit)
            if len(q):
                found_q.append(q + start)
                found_i.append(i + first_item)
                found_d.append(c[q, i])
    if not found_q:
        return _empty()
    return _sorted_neighbours(np.concatenate(found_q).astype(np.int64), np.concatenate(found_i).astype(np.int64),
                              np.concatenate(found_d).astype(np.int64))


# ---- compiled kernels ------------------------------------------------------------------------

@intrinsic
def _popcount(typingctx, value):
    """Bits set in a 64-bit word: one POPCNT instruction (numba has no popcount of its own)."""
    if not (isinstance(value, types.Integer) and value.bitwidth == 64):
        return None

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.int64(value), codegen


@numba.njit(cache=True)
def _reserved(out_query, out_item, out_distance, needed):
    """The three output columns, copied into arrays of at least ``needed`` (doubling) entries."""
    capacity = max(needed, 2 * len(out_query))
    grown = (np.empty(capacity, np.int64), np.empty(capacity, np.int64), np.empty(capacity, np.int64))
    grown[0][:len(out_query)] = out_query
    grown[1][:len(out_item)] = out_item
    grown[2][:len(out_distance)] = out_distance
    return grown


@numba.njit(cache=True)
def _bucket_sort(items, shift, width, order_out, bucketed_out, offsets_out):
    """Counting sort of the items by one chunk value: ids and hashes in bucket order, and where
    each bucket starts (``offsets_out[v] .. offsets_out[v + 1]``). Stable, so ids rise in a bucket."""
    buckets = 1 << width
    low, s = np.uint64(buckets - 1), np.uint64(shift)
    offsets_out[:] = 0
    for i in range(len(items)):
        offsets_out[np.int64((items[i] >> s) & low) + 1] += 1
    for b in range(buckets):
        offsets_out[b + 1] += offsets_out[b]
    fill = offsets_out[:buckets].copy()
    for i in range(len(items)):
        value = np.int64((items[i] >> s) & low)
        place = fill[value]
        order_out[place] = i
        bucketed_out[place] = items[i]
        fill[value] = place + 1


@numba.njit(cache=True)
def _found_in_earlier_chunk(difference, chunk, shifts, widths, radii):
    for earlier in range(chunk):
        if radii[earlier] >= 0:
            bits = (difference >> np.uint64(shifts[earlier])) & np.uint64((1 << widths[earlier]) - 1)
            if _popcount(bits) <= radii[earlier]:
                return True
    return False


@numba.njit(cache=True)
def _record_matches(query_hash, query_id, radius, chunk, shifts, widths, radii, first_item, end_item, bucketed,
                    order, out_query, out_item, out_distance, found):
    for j in range(first_item, end_item):
        difference = query_hash ^ bucketed[j]
        distance = _popcount(difference)
        if distance <= radius and not _found_in_earlier_chunk(difference, chunk, shifts, widths, radii):
            out_query[found] = query_id
            out_item[found] = order[j]
            out_distance[found] = distance
            found += 1
    return found


@numba.njit(cache=True)
def _check_bucket(radius, chunk, shifts, widths, radii, first_item, end_item, bucketed, order,
                  probe_hash, probe_query, first_probe, end_probe, out_query, out_item, out_distance, found):
    """Check one bucket's items against its probes. Matches are rare, so probes first count them,
    two at a time per pass over the items (a loop LLVM vectorises; two probes per loaded item
    halve the loads), and only a probe with matches walks the items again to record them. Returns
    the next probe when the output could overflow, so that the caller grows it outside these
    loops: an array reallocated in them makes numba's code several times slower."""
    p = first_probe
    while p < end_probe:
        paired = p + 1 < end_probe
        hash_0 = probe_hash[p]
        hash_1 = probe_hash[p + 1] if paired else hash_0
        matches_0, matches_1 = 0, 0
        for j in range(first_item, end_item):
            item_hash = bucketed[j]
            matches_0 += _popcount(hash_0 ^ item_hash) <= radius
            matches_1 += _popcount(hash_1 ^ item_hash) <= radius
        if not paired:
            matches_1 = 0
        if found + matches_0 + matches_1 > len(out_query):
            return found, p
        if matches_0:
            found = _record_matches(hash_0, probe_query[p], radius, chunk, shifts, widths, radii, first_item,
                                    end_item, bucketed, order, out_query, out_item, out_distance, found)
        if matches_1:
            found = _record_matches(hash_1, probe_query[p + 1], radius, chunk, shifts, widths, radii, first_item,
                                    end_item, bucketed, order, out_query, out_item, out_distance, found)
        p += 2
    return found, end_probe


@numba.njit(cache=True)
def _search_chunk(queries, first_query, radius, chunk, shifts, widths, radii, masks, order, bucketed, offsets,
                  out_query, out_item, out_distance, found):
    """Pairs within ``radius`` first found in one chunk's table. The batch's probe keys are sorted
    by bucket, so the table is walked once in address order and each bucket's items are checked
    against all its probes while in cache (random jumps cost a cache miss per probe)."""
    buckets = 1 << widths[chunk]
    low, shift = np.uint64(buckets - 1), np.uint64(shifts[chunk])
    probe_count = len(queries) * len(masks)
    probe_query = np.empty(probe_count, np.int64)
    probe_hash = np.empty(probe_count, np.uint64)
    sparse = probe_count * 4 < buckets  # few probes in a wide chunk: sort them, do not count buckets
    if sparse:
        keys = np.empty(probe_count, np.int64)
        for q in range(len(queries)):
            value = np.int64((queries[q] >> shift) & low)
            for k in range(len(masks)):
                keys[q * len(masks) + k] = value ^ masks[k]
        by_bucket = np.argsort(keys)
        bucket_keys = keys[by_bucket]
        for p in range(probe_count):
            probe_query[p] = by_bucket[p] // len(masks) + first_query
            probe_hash[p] = queries[by_bucket[p] // len(masks)]
        heads = np.empty(0, np.int32)
    else:
        heads = np.zeros(buckets + 1, np.int32)
        for q in range(len(queries)):
            value = np.int64((queries[q] >> shift) & low)
            for k in range(len(masks)):
                heads[(value ^ masks[k]) + 1] += 1
        for b in range(buckets):
            heads[b + 1] += heads[b]
        fill = heads[:buckets].copy()
        for q in range(len(queries)):
            value = np.int64((queries[q] >> shift) & low)
            for k in range(len(masks)):
                place = fill[value ^ masks[k]]
                probe_query[place] = q + first_query
                probe_hash[place] = queries[q]
                fill[value ^ masks[k]] = place + 1
        bucket_keys = np.empty(0, np.int64)
    first_probe, key = 0, 0
    while first_probe < probe_count:
        if sparse:
            key = bucket_keys[first_probe]
            end_probe = first_probe + 1
            while end_probe < probe_count and bucket_keys[end_probe] == key:
                end_probe += 1
        else:
            while heads[key + 1] == first_probe:  # empty bucket
                key += 1
            end_probe = np.int64(heads[key + 1])
        next_probe = first_probe
        while next_probe < end_probe:
            found, next_probe = _check_bucket(radius, chunk, shifts, widths, radii, offsets[key], offsets[key + 1],
                                              bucketed, order, probe_hash, probe_query, next_probe, end_probe,
                                              out_query, out_item, out_distance, found)
            if next_probe < end_probe:
                out_query, out_item, out_distance = _reserved(out_query, out_item, out_distance,
                                                              found + 2 * (offsets[key + 1] - offsets[key]))
        first_probe = end_probe
        key += 1
    return found, out_query, out_item, out_distance


@numba.njit(cache=True)
def _scan(queries, items, radius):
    """Every (query, item, distance) within ``radius`` by checking all pairs: a block of items
    stays in L1 while every query passes over it."""
    capacity = max(16, len(queries))
    out_query = np.empty(capacity, np.int64)
    out_item = np.empty(capacity, np.int64)
    out_distance = np.empty(capacity, np.int64)
    found = 0
    block = 2048
    close = np.empty(block, np.int64)  # one query's matches in one block: the hot loop never reallocates
    for first_item in range(0, len(items), block):
        end_item = min(first_item + block, len(items))
        for q in range(len(queries)):
            query_hash = queries[q]
            matches = 0
            for i in range(first_item, end_item):
                if _popcount(query_hash ^ items[i]) <= radius:
                    close[matches] = i
                    matches += 1
            if matches:
                if found + matches > len(out_query):
                    out_query, out_item, out_distance = _reserved(out_query, out_item, out_distance, found + matches)
                for k in range(matches):
                    out_query[found] = q
                    out_item[found] = close[k]
                    out_distance[found] = _popcount(query_hash ^ items[close[k]])
                    found += 1
    return out_query[:found], out_item[:found], out_distance[:found]


def scan_neighbours(hashes, queries, radius: int) -> Neighbours:
    """Exact radius search by a compiled scan of every pair: cheapest for a handful of queries."""
    _check_radius(radius)
    items, probes = as_uint64(hashes), as_uint64(queries)
    if len(items) == 0 or len(probes) == 0:
        return _empty()
    return _sorted_neighbours(*_scan(probes, items, radius))


def warm_up() -> None:
    """Compile (or load from numba's cache) every kernel, on tiny inputs."""
    hashes = np.arange(40, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    HammingIndex(hashes, 3).query(hashes)
    scan_neighbours(hashes, hashes, 3)


class HammingIndex:
    """Exact radius-``radius`` search among a fixed set of 64-bit hashes (signed or unsigned)."""

    def __init__(self, hashes, radius: int, chunk_count: int | None = None):
        _check_radius(radius)
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
        # Chunks never probed at this radius (refined pigeonhole) need no table; a smaller radius
        # never probes a chunk a larger one skips.
        self._probed = [k for k, flips in enumerate(chunk_radii(radius, m)) if flips >= 0]
        widest = max(self.chunks[k][1] for k in self._probed)
        n = len(self.items)
        self._orders = np.empty((len(self._probed), n), np.int64)
        self._bucketed = np.empty((len(self._probed), n), np.uint64)
        self._offsets = np.empty((len(self._probed), (1 << widest) + 1), np.int64)
        for row, k in enumerate(self._probed):
            offset, width = self.chunks[k]
            _bucket_sort(self.items, offset, width, self._orders[row], self._bucketed[row], self._offsets[row])
        self._shifts = np.array([self.chunks[k][0] for k in self._probed], np.int64)
        self._widths = np.array([self.chunks[k][1] for k in self._probed], np.int64)

    def __len__(self) -> int:
        return len(self.items)

    def query(self, queries, radius: int | None = None) -> Neighbours:
        """Every (query, item) pair within ``radius`` (default: the index's radius), exactly."""
        radius = self.radius if radius is None else radius
        if not 0 <= radius <= self.radius:
            raise ValueError(f"index built for radius {self.radius}, asked for {radius}")
        probes = as_uint64(queries)
        if len(probes) == 0 or len(self.items) == 0:
            return _empty()
        all_radii = chunk_radii(radius, len(self.chunks))
        radii = np.array([all_radii[k] for k in self._probed], np.int64)
        masks = [_flip_masks(int(w), max(int(r), 0)) for w, r in zip(self._widths, radii)]
        step = max(1, PROBE_KEYS_PER_BATCH // max(len(m) for m in masks))
        columns = (np.empty(len(probes), np.int64), np.empty(len(probes), np.int64), np.empty(len(probes), np.int64))
        found = 0
        for start in range(0, len(probes), step):
            block = probes[start:start + step]
            for row, chunk_masks in enumerate(masks):
                if radii[row] >= 0:
                    found, *columns = _search_chunk(block, start, radius, row, self._shifts, self._widths, radii,
                                                    chunk_masks, self._orders[row], self._bucketed[row],
                                                    self._offsets[row], *columns, found)
        return _sorted_neighbours(*(column[:found] for column in columns))

    def self_join(self) -> Neighbours:
        """Every pair of distinct items ``query < item`` within the radius (items are the queries)."""
        pairs = self.query(self.items)
        keep = pairs.query < pairs.item
        return Neighbours(pairs.query[keep], pairs.item[keep], pairs.distance[keep])

"""Near-duplicate pairs and clusters from perceptual hashes (pure functions, no I/O).

Two images are near-duplicates when their pHash distance plus their dHash distance is within a
threshold (rule and default chosen by measurement in ``benchmarks/near_duplicates.py``). Clusters are the connected components of that relation, so
they do not depend on the order images arrive in: adding images can only merge clusters, which
is what lets the nightly run update clusters incrementally and still match a full recomputation.
:func:`guarded_labels` adds the second signal's pairs on top without chaining through them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dataset.dedup.hamming_index import radius_neighbours
from dataset.dedup.hashing import HASH_BITS, as_uint64


@dataclass(frozen=True)
class DuplicateRule:
    """Near-duplicates: pHash distance + dHash distance <= ``threshold`` (0..128), and one of the two
    distances <= ``candidate_radius`` (unset: ``threshold // 2``, which the sum already implies).

    The sum is the Hamming distance between the two 128-bit concatenations (pHash, dHash); it
    beat ``pHash <= a AND dHash <= b`` on the tuning photos (see docs/benchmarks.md). The second
    condition is what makes the search fast: neighbours are looked up within ``candidate_radius``
    of each hash, and a small radius keeps the multi-index search far below a full scan.
    """
    threshold: int
    candidate_radius: int | None = None

    def __post_init__(self):
        if not 0 <= self.threshold <= 2 * HASH_BITS:
            raise ValueError(f"dedup threshold must be within 0..{2 * HASH_BITS}, got {self.threshold}")
        if self.candidate_radius is not None and not 0 <= self.candidate_radius <= HASH_BITS:
            raise ValueError(f"dedup candidate radius must be within 0..{HASH_BITS}, got {self.candidate_radius}")

    @property
    def index_radius(self) -> int:
        # p + d <= t implies min(p, d) <= t // 2: a radius search on either hash finds every pair.
        implied = self.threshold // 2
        return implied if self.candidate_radius is None else min(implied, self.candidate_radius)

    def matches(self, phash_distance, dhash_distance):
        p, d = np.asarray(phash_distance), np.asarray(dhash_distance)
        return ((p + d) <= self.threshold) & (np.minimum(p, d) <= self.index_radius)

    def describe(self) -> str:
        bound = "" if self.index_radius == self.threshold // 2 else f" and min(phash, dhash) <= {self.index_radius}"
        return f"phash + dhash <= {self.threshold}{bound}"


@dataclass(frozen=True)
class Pairs:
    """Near-duplicate pairs: ``first[k] < second[k]`` (positions) and their combined distance."""
    first: np.ndarray
    second: np.ndarray
    distance: np.ndarray

    def __len__(self) -> int:
        return len(self.first)


def find_pairs(phashes, dhashes, rule: DuplicateRule, query_positions=None) -> Pairs:
    """Near-duplicate pairs among all items, or between ``query_positions`` and all items.

    Candidates come from a radius-``threshold // 2`` search on each hash (one of the two must be
    that close); the combined distance then decides. Each unordered pair appears once.
    """
    phashes, dhashes = as_uint64(phashes), as_uint64(dhashes)
    queries = (np.arange(len(phashes), dtype=np.int64) if query_positions is None
               else np.unique(np.asarray(query_positions, dtype=np.int64)))
    firsts, seconds = [], []
    for hashes in (phashes, dhashes):
        found = radius_neighbours(hashes, hashes[queries], rule.index_radius)
        firsts.append(queries[found.query])
        seconds.append(found.item)
    first, second = np.concatenate(firsts), np.concatenate(seconds)
    low, high = np.minimum(first, second), np.maximum(first, second)
    key = np.unique(low[low != high] * np.int64(max(len(phashes), 1)) + high[low != high])
    low, high = np.divmod(key, np.int64(max(len(phashes), 1)))
    phash_distance = hamming_distances(phashes[low], phashes[high])
    dhash_distance = hamming_distances(dhashes[low], dhashes[high])
    keep = rule.matches(phash_distance, dhash_distance)
    return Pairs(low[keep], high[keep], (phash_distance + dhash_distance)[keep])


def component_labels(count: int, first, second) -> np.ndarray:
    """Connected-component label (0..k-1) of each of ``count`` nodes joined by the given edges."""
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    first, second = np.asarray(first, dtype=np.int64), np.asarray(second, dtype=np.int64)
    graph = coo_matrix((np.ones(len(first), dtype=np.int8), (first, second)), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


def representative_order(pixels: Sequence[int], first_seen: Sequence, sha256: Sequence[str]) -> list[int]:
    """Positions sorted best representative first: largest resolution, then earliest, then sha256."""
    return sorted(range(len(sha256)), key=lambda k: (-pixels[k], first_seen[k], sha256[k]))


def hamming_distances(a, b) -> np.ndarray:
    return np.bitwise_count(as_uint64(a) ^ as_uint64(b)).astype(np.int64)


def guarded_labels(count: int, first, second, extra_first, extra_second, extra_score, priority,
                   joins, max_attach: int) -> np.ndarray:
    """Cluster label of each of ``count`` nodes: connected components of the trusted edges
    (``first``, ``second``: the hash rule's pairs, stored clusters), then the ``extra`` edges (the
    embedding's pairs) merge two clusters only under a guard, so they never chain distinct photos.

    Extra edges are taken best ``extra_score`` first; one merges clusters X and Y only when the
    smaller has at most ``max_attach`` members (an edge attaches a re-upload and the few copies the
    hashes link to it, never two established clusters) and ``joins(rep X, rep Y)`` accepts the two
    clusters' current representatives (lowest ``priority``, then lowest position), so every
    attached image also stands the rule against the cluster's representative, not only against
    whichever member it happened to be close to.
    """
    labels = component_labels(count, first, second)
    if count == 0 or len(extra_first) == 0:
        return labels
    priority = np.asarray(priority)
    order = np.lexsort((np.arange(count), priority))
    rank = np.empty(count, dtype=np.int64)
    rank[order] = np.arange(count)
    best = np.full(labels.max() + 1, count, dtype=np.int64)
    np.minimum.at(best, labels, rank)
    rep = order[best]  # each component's best member
    size = np.bincount(labels).astype(np.int64)
    parent = np.arange(len(rep))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    extra_first, extra_second = np.asarray(extra_first, np.int64), np.asarray(extra_second, np.int64)
    for e in np.lexsort((extra_second, extra_first, -np.asarray(extra_score, dtype=np.float64))):
        x, y = root(labels[extra_first[e]]), root(labels[extra_second[e]])
        if x == y or min(size[x], size[y]) > max_attach or not joins(int(rep[x]), int(rep[y])):
            continue
        if rank[rep[y]] < rank[rep[x]]:
            x, y = y, x
        parent[y] = x
        size[x] += size[y]
    roots = np.array([root(k) for k in range(len(rep))], dtype=np.int64)
    _, merged = np.unique(roots[labels], return_inverse=True)
    return merged.astype(np.int64)

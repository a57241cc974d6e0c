"""Hashing and the Hamming index: exact radius search and deterministic clusters, no services."""
from __future__ import annotations

from collections import namedtuple
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image, ImageOps

from dataset.dedup import assign_clusters
from dataset.dedup_clusters import DuplicateRule, component_labels, find_pairs
from dataset.hamming_index import (HammingIndex, brute_force_neighbours, cheapest_method, choose_chunk_count,
                                   chunk_radii, probe_scan_neighbours, radius_neighbours)
from dataset.hashing import as_uint64, hamming, hashes_of_image, to_signed64, to_unsigned64


def planted_hashes(rng: np.random.Generator, count: int, near_per_seed: int, max_flips: int) -> np.ndarray:
    """Uniform random 64-bit hashes plus, for some of them, copies with a few bits flipped."""
    seeds = rng.integers(0, 2**63, count, dtype=np.int64).view(np.uint64) ^ (
        rng.integers(0, 2, count).astype(np.uint64) << np.uint64(63))
    near = []
    for seed in seeds[: count // 4]:
        for _ in range(near_per_seed):
            flips = rng.choice(64, size=rng.integers(0, max_flips + 1), replace=False)
            near.append(int(seed) ^ sum(1 << int(b) for b in flips))
    return np.concatenate([seeds, np.array(near, dtype=np.uint64)])


@pytest.mark.parametrize("seed", range(6))
def test_index_returns_exactly_the_brute_force_result_set(seed):
    rng = np.random.default_rng(seed)
    hashes = planted_hashes(rng, count=3000, near_per_seed=3, max_flips=14)
    queries = np.concatenate([hashes[rng.choice(len(hashes), 300, replace=False)],
                              rng.integers(0, 2**63, 50, dtype=np.int64).view(np.uint64)])
    chunk_count = [None, 3, 4, 6, 8, 13][seed]
    # Three 21-22 bit chunks probe ~10^5 keys per chunk beyond radius 11: exact but slow to test.
    for radius in (0, 3, 7, 11) if chunk_count == 3 else (0, 3, 7, 12, 16):
        index = HammingIndex(hashes, radius, chunk_count=chunk_count)
        expected = brute_force_neighbours(hashes, queries, radius).as_set()
        assert index.query(queries).as_set() == expected, (radius, chunk_count)
        # A smaller radius on the same index is exact too.
        assert index.query(queries, radius // 2).as_set() == brute_force_neighbours(
            hashes, queries, radius // 2).as_set()


@pytest.mark.parametrize("chunk_count", [3, 4, 5, 7])
def test_probe_scan_returns_exactly_the_brute_force_result_set(chunk_count):
    rng = np.random.default_rng(chunk_count)
    hashes = planted_hashes(rng, count=3000, near_per_seed=3, max_flips=14)
    queries = hashes[rng.choice(len(hashes), 200, replace=False)]
    for radius in (0, 5, 12):
        expected = brute_force_neighbours(hashes, queries, radius).as_set()
        assert probe_scan_neighbours(hashes, queries, radius, chunk_count).as_set() == expected
        assert radius_neighbours(hashes, queries, radius).as_set() == expected


def test_chunk_radii_are_the_tight_pigeonhole_split_of_the_radius():
    # A pair escapes every chunk only if chunk k differs in radii[k] + 1 bits or more, for all k:
    # that needs sum(radii[k] + 1) = radius + 1 bits, so nothing within the radius escapes.
    for chunk_count in range(1, 9):
        for radius in range(0, 25):
            radii = chunk_radii(radius, chunk_count)
            assert sum(r + 1 for r in radii) == radius + 1 and min(radii) >= -1
            assert max(radii) - min(radii) <= 1


def test_search_method_follows_the_batch_size():
    assert cheapest_method(1_000_000, 1, 12) == "brute force"  # one new image: a scan is cheapest
    assert cheapest_method(1_000_000, 500, 12) != "brute force"
    assert cheapest_method(1_000_000, 1_000_000, 12) == "index"  # re-clustering everything


def test_index_self_join_lists_each_close_pair_once():
    rng = np.random.default_rng(42)
    hashes = planted_hashes(rng, count=2000, near_per_seed=2, max_flips=6)
    pairs = HammingIndex(hashes, 8).self_join()
    brute = brute_force_neighbours(hashes, hashes, 8)
    expected = {(q, i, d) for q, i, d in brute.as_set() if q < i}
    assert pairs.as_set() == expected and len(pairs) == len(expected) > 0


def test_index_accepts_signed_bigint_hashes_like_the_manifest_stores_them():
    unsigned = np.array([0, 2**64 - 1, 2**63, 2**63 - 1, 0xF0F0F0F0F0F0F0F0], dtype=np.uint64)
    signed = unsigned.view(np.int64)
    assert HammingIndex(signed, 4).query(signed).as_set() == HammingIndex(unsigned, 4).query(unsigned).as_set()
    assert [to_unsigned64(to_signed64(int(v))) for v in unsigned] == [int(v) for v in unsigned]


def test_chunk_count_grows_with_radius_and_rejects_impossible_radius():
    assert choose_chunk_count(1_000_000, 2) <= choose_chunk_count(1_000_000, 30)
    with pytest.raises(ValueError, match="radius"):
        HammingIndex(np.zeros(3, dtype=np.uint64), 65)


def photo(seed: int, size=(320, 240)) -> Image.Image:
    """A smooth synthetic 'photo': a few random colour blobs, so perceptual hashes behave."""
    small = np.random.RandomState(seed).randint(0, 256, (6, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def test_border_is_trimmed_before_hashing_so_a_framed_copy_hashes_alike():
    original = photo(1)
    framed = ImageOps.expand(original, border=25, fill=(255, 255, 255))
    a, b = hashes_of_image(original), hashes_of_image(framed)
    untrimmed = hashes_of_image(framed, trim_border=False)
    assert hamming(a.phash, b.phash) + hamming(a.dhash, b.dhash) <= 4
    assert hamming(a.phash, untrimmed.phash) + hamming(a.dhash, untrimmed.dhash) > 10


def test_pairs_use_the_combined_distance_and_clusters_are_connected_components():
    base = hashes_of_image(photo(7))
    p, d = to_unsigned64(base.phash), to_unsigned64(base.dhash)
    phashes = [p, p ^ 0b111, p ^ (0xFF << 20), p ^ 0b11, to_unsigned64(hashes_of_image(photo(8)).phash)]
    dhashes = [d, d ^ 0b1, d ^ 0b1111, d ^ (0xFFFF << 30), to_unsigned64(hashes_of_image(photo(8)).dhash)]
    pairs = find_pairs(as_uint64(phashes), as_uint64(dhashes), DuplicateRule(10))
    found = {(int(a), int(b), int(c)) for a, b, c in zip(pairs.first, pairs.second, pairs.distance)}
    # 0-1: 3 + 1 = 4; 0-3: 2 + 16 (too far); 1-3: 1 + 17; 0-2: 8 + 4 = 12 (too far); 1-2: 11 + 3.
    assert found == {(0, 1, 4)}
    assert list(component_labels(5, pairs.first, pairs.second)) == [0, 0, 1, 2, 3]


def test_candidate_radius_bounds_the_smaller_of_the_two_distances():
    rng = np.random.default_rng(5)
    phashes = planted_hashes(rng, count=1500, near_per_seed=2, max_flips=14)
    dhashes = phashes ^ rng.integers(0, 2**20, len(phashes)).astype(np.uint64)  # copies near in both
    rule = DuplicateRule(25, candidate_radius=6)
    assert rule.index_radius == 6 and DuplicateRule(25).index_radius == 12
    assert list(rule.matches([6, 7, 12, 3], [19, 7, 1, 23])) == [True, False, True, False]
    p = np.bitwise_count(phashes[:, None] ^ phashes[None, :])
    d = np.bitwise_count(dhashes[:, None] ^ dhashes[None, :])
    first, second = np.nonzero(np.triu(rule.matches(p, d), k=1))
    pairs = find_pairs(phashes, dhashes, rule)
    assert set(zip(pairs.first.tolist(), pairs.second.tolist())) == set(zip(first.tolist(), second.tolist()))
    assert len(pairs) > 0
    with pytest.raises(ValueError, match="candidate radius"):
        DuplicateRule(25, candidate_radius=65)


Row = namedtuple("Row", "sha256 phash dhash width height first_seen_run created_at product_id")


def synthetic_rows(count: int, seed: int) -> list[Row]:
    rng = np.random.default_rng(seed)
    hashes = planted_hashes(rng, count=count, near_per_seed=3, max_flips=8)
    rows = []
    for k, h in enumerate(hashes):
        dh = int(h) ^ int(rng.integers(0, 2**16))  # dHash near the pHash keeps planted copies close
        rows.append(Row(f"{k:064x}", to_signed64(int(h)), to_signed64(dh), int(rng.integers(50, 400)),
                        int(rng.integers(50, 400)), int(rng.integers(1, 4)),
                        datetime(2026, 1, 1 + k % 28, tzinfo=timezone.utc), int(rng.integers(1, 4))))
    return rows


def test_incremental_assignment_equals_clustering_everything_at_once():
    rows = synthetic_rows(400, seed=3)
    rule = DuplicateRule(22)
    arrival = np.random.default_rng(9).permutation(len(rows))
    stored: dict[str, tuple] = {}
    for batch in np.array_split(arrival, 4):
        known = {r.sha256 for r in rows if r.sha256 in stored} | {rows[k].sha256 for k in batch}
        visible = sorted((r for r in rows if r.sha256 in known), key=lambda r: r.sha256)
        decided, _ = assign_clusters(visible, stored, rule, full=False)
        for row in decided:
            stored[row.sha256] = (row.cluster_id, row.duplicate_of, row.distance, rule.threshold,
                                  row.spans_products)
    everything, queried = assign_clusters(sorted(rows, key=lambda r: r.sha256), {}, rule, full=True)
    assert queried == len(rows)
    at_once = {r.sha256: (r.cluster_id, r.duplicate_of, r.distance, rule.threshold, r.spans_products)
               for r in everything}
    assert stored == at_once
    assert sum(1 for v in at_once.values() if v[1] is not None) > 50  # planted copies were clustered

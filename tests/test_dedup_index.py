"""Hashing and the Hamming index: exact radius search and deterministic clusters, no services."""
from __future__ import annotations

from collections import namedtuple
from datetime import datetime, timezone

import numpy as np
import pytest
from PIL import Image, ImageOps

from dataset.dedup.stage import assign_clusters
from dataset.dedup.clusters import DuplicateRule, component_labels, find_pairs
from dataset.dedup import hamming_index
from dataset.dedup.hamming_index import (HammingIndex, brute_force_neighbours, cheapest_method, choose_chunk_count,
                                   chunk_radii, radius_neighbours, scan_neighbours)
from dataset.dedup.hashing import as_uint64, hamming, hashes_of_image, to_signed64, to_unsigned64


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


def naive_neighbours(hashes, queries, radius) -> set[tuple[int, int, int]]:
    """The definition, one pair at a time in Python: what every search must return."""
    return {(q, i, bin(int(a) ^ int(b)).count("1")) for q, a in enumerate(as_uint64(queries))
            for i, b in enumerate(as_uint64(hashes)) if bin(int(a) ^ int(b)).count("1") <= radius}


@pytest.mark.parametrize("seed", range(6))
def test_index_returns_exactly_the_brute_force_result_set(seed):
    rng = np.random.default_rng(seed)
    hashes = planted_hashes(rng, count=3000, near_per_seed=3, max_flips=14)
    queries = np.concatenate([hashes[rng.choice(len(hashes), 300, replace=False)],
                              rng.integers(0, 2**63, 50, dtype=np.int64).view(np.uint64)])
    chunk_count = [None, 3, 4, 5, 8, 13][seed]
    # Three 21-22 bit chunks probe ~10^5 keys per chunk beyond radius 11: exact but slow to test.
    for radius in (0, 3, 7, 11) if chunk_count == 3 else (0, 1, 3, 7, 12, 16):
        index = HammingIndex(hashes, radius, chunk_count=chunk_count)
        expected = brute_force_neighbours(hashes, queries, radius)
        found = index.query(queries)
        assert found.as_set() == expected.as_set(), (radius, chunk_count)
        assert len(found) == len(expected)  # a pair close in several chunks is listed once
        # A smaller radius on the same index is exact too.
        assert index.query(queries, radius // 2).as_set() == brute_force_neighbours(
            hashes, queries, radius // 2).as_set()


def test_brute_force_baseline_is_the_definition_whatever_its_block_shape():
    rng = np.random.default_rng(11)
    hashes = planted_hashes(rng, count=300, near_per_seed=2, max_flips=10)
    queries = hashes[rng.choice(len(hashes), 37, replace=False)]
    expected = naive_neighbours(hashes, queries, 10)
    assert len(expected) > len(queries)  # planted copies are found, not only the queries themselves
    for queries_per_step, items_per_step in [(4, 16_384), (1, 7), (5, 64), (37, 300), (100, 1000)]:
        found = brute_force_neighbours(hashes, queries, 10, queries_per_step, items_per_step)
        assert found.as_set() == expected and len(found) == len(expected)


@pytest.mark.parametrize("radius", [0, 1, 5, 12, 20, 64])
def test_compiled_scan_and_automatic_search_return_exactly_the_brute_force_result_set(radius):
    rng = np.random.default_rng(radius)
    hashes = planted_hashes(rng, count=1500, near_per_seed=3, max_flips=14)
    queries = np.concatenate([hashes[rng.choice(len(hashes), 120, replace=False)],
                              rng.integers(0, 2**63, 10, dtype=np.int64).view(np.uint64)])
    expected = brute_force_neighbours(hashes, queries, radius)
    assert len(expected) >= 120
    assert scan_neighbours(hashes, queries, radius).as_set() == expected.as_set()
    assert radius_neighbours(hashes, queries, radius).as_set() == expected.as_set()
    if radius <= 20:  # radius 64 lists all 1500 x 130 pairs: the index would probe every bucket
        assert HammingIndex(hashes, radius).query(queries).as_set() == expected.as_set()


def test_planted_near_copies_of_random_hashes_are_found_at_every_distance_up_to_the_radius():
    rng = np.random.default_rng(21)
    originals = rng.integers(0, 2**63, 2000, dtype=np.int64).view(np.uint64)
    flips = np.arange(2000) % 14  # a copy of each original with 0..13 bits flipped
    copies = np.array([int(h) ^ sum(1 << int(b) for b in rng.choice(64, f, replace=False))
                       for h, f in zip(originals, flips)], dtype=np.uint64)
    found = HammingIndex(copies, 12).query(originals)
    pairs = {(q, i): d for q, i, d in found.as_set()}
    for k in range(2000):
        assert (pairs.get((k, k)) == flips[k]) if flips[k] <= 12 else (k, k) not in pairs
    assert found.as_set() == brute_force_neighbours(copies, originals, 12).as_set()


def test_index_in_many_small_batches_with_a_growing_output_gives_the_same_pairs(monkeypatch):
    rng = np.random.default_rng(8)
    base = rng.integers(0, 2**63, 40, dtype=np.int64).view(np.uint64)
    hashes = np.repeat(base, 50) ^ rng.integers(0, 8, 2000).astype(np.uint64)  # 50 near-copies each
    expected = brute_force_neighbours(hashes, hashes, 6)
    assert len(expected) == 50 * len(hashes)  # far more pairs than queries: the output must grow
    one_batch = HammingIndex(hashes, 6).query(hashes)
    monkeypatch.setattr(hamming_index, "PROBE_KEYS_PER_BATCH", 500)
    many_batches = HammingIndex(hashes, 6).query(hashes)
    assert one_batch.as_set() == many_batches.as_set() == expected.as_set()
    assert list(many_batches.query) == list(expected.query) and list(many_batches.item) == list(expected.item)


def test_empty_inputs_and_out_of_range_radii():
    rng = np.random.default_rng(3)
    hashes = rng.integers(0, 2**63, 100, dtype=np.int64).view(np.uint64)
    none = np.zeros(0, dtype=np.uint64)
    for search in (brute_force_neighbours, scan_neighbours, radius_neighbours,
                   lambda h, q, r: HammingIndex(h, r).query(q)):
        assert len(search(hashes, none, 12)) == 0
        assert len(search(none, hashes, 12)) == 0
        assert len(search(none, none, 0)) == 0
    assert len(HammingIndex(none, 12).self_join()) == 0
    for bad in (-1, 65):
        with pytest.raises(ValueError, match="radius"):
            scan_neighbours(hashes, hashes, bad)
        with pytest.raises(ValueError, match="radius"):
            HammingIndex(hashes, bad)
    with pytest.raises(ValueError, match="radius"):
        HammingIndex(hashes, 4).query(hashes, 5)  # an index answers only within the radius it was built for
def test_chunk_radii_are_the_tight_pigeonhole_split_of_the_radius():
    # A pair escapes every chunk only if chunk k differs in radii[k] + 1 bits or more, for all k:
    # that needs sum(radii[k] + 1) = radius + 1 bits, so nothing within the radius escapes.
    for chunk_count in range(1, 9):
        for radius in range(0, 25):
            radii = chunk_radii(radius, chunk_count)
            assert sum(r + 1 for r in radii) == radius + 1 and min(radii) >= -1
            assert max(radii) - min(radii) <= 1


def test_search_method_follows_the_batch_size():
    assert cheapest_method(1_000_000, 1, 12) == "scan"  # one new image: building tables would not pay
    assert cheapest_method(1_000_000, 5_000, 12) == "index"
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

"""Labels, product selection and splits of a dataset version (pure functions, no services)."""
from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass

import pytest

from dataset.build.labels import assign_labels
from dataset.build.selection import select_photos
from dataset.build.splits import SplitCandidate, SplitRatios, assign_splits, clusters_spanning_splits
from shoplens.config import ConfigError

RATIOS = SplitRatios.parse(0.7, 0.15, 0.15)


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def singletons(product_id: int, start: int, count: int) -> list[SplitCandidate]:
    return [SplitCandidate(sha(i), product_id, sha(i)) for i in range(start, start + count)]


def test_new_products_get_the_next_labels_and_dropped_labels_stay_reserved():
    existing = {500: 0, 200: 1, 900: 2}  # 900 dropped out of the dataset, its label stays taken
    assert assign_labels(existing, [200, 500, 700, 100]) == {100: 3, 700: 4}
    assert assign_labels({}, [30, 10, 20]) == {10: 0, 20: 1, 30: 2}
    assert assign_labels(existing, [200, 500]) == {}


def test_split_ratios_must_be_positive_and_sum_to_one():
    with pytest.raises(ConfigError, match="sum to 1"):
        SplitRatios.parse(0.7, 0.2, 0.2)
    with pytest.raises(ConfigError, match="> 0"):
        SplitRatios.parse(1.0, 0.0, 0.0)


@dataclass(frozen=True)
class Photo:
    sha256: str
    product_id: int


def test_selection_leaves_out_small_products_and_caps_large_ones_deterministically():
    photos = [Photo(sha(i), 1) for i in range(3)] + [Photo(sha(i), 2) for i in range(10, 30)]
    shuffled = photos[:]
    random.Random(7).shuffle(shuffled)

    first = select_photos(photos, min_photos=5, max_photos=8, in_parent=set(), seed="s")
    again = select_photos(shuffled, min_photos=5, max_photos=8, in_parent=set(), seed="s")

    assert first.excluded == [{"product_id": 1, "photos": 3}]
    assert first.capped == [{"product_id": 2, "photos": 20, "selected": 8}]
    assert [p.sha256 for p in first.chosen] == [p.sha256 for p in again.chosen]
    assert len(first.chosen) == 8 and {p.product_id for p in first.chosen} == {2}
    other_seed = select_photos(photos, min_photos=5, max_photos=8, in_parent=set(), seed="t")
    assert {p.sha256 for p in other_seed.chosen} != {p.sha256 for p in first.chosen}


def test_the_cap_keeps_the_parent_versions_photos_first():
    photos = [Photo(sha(i), 2) for i in range(20)]
    in_parent = {sha(i) for i in range(12, 20)}
    chosen = select_photos(photos, min_photos=1, max_photos=8, in_parent=in_parent, seed="s").chosen
    assert {p.sha256 for p in chosen} == in_parent


def test_every_product_gets_train_photos_and_shares_close_to_the_ratios():
    candidates = [c for p in range(20) for c in singletons(p, p * 1000, 3 + p * 7)]
    result = assign_splits(candidates, {}, RATIOS, seed="seed")

    per_product: dict[int, Counter] = defaultdict(Counter)
    for c in candidates:
        per_product[c.product_id][result.splits[c.sha256]] += 1
    for product_id, counts in per_product.items():
        total = sum(counts.values())
        assert counts["train"] >= 1, product_id
        for split in ("train", "val", "test"):
            # quota filling keeps each product within one image of its target share
            assert abs(counts[split] - float(RATIOS.of(split)) * total) <= 1.0, (product_id, counts)
    assert result.new == len(candidates) and result.kept == 0


def test_splits_do_not_depend_on_input_order_but_do_depend_on_the_seed():
    candidates = [c for p in range(5) for c in singletons(p, p * 100, 40)]
    shuffled = candidates[:]
    random.Random(3).shuffle(shuffled)
    a = assign_splits(candidates, {}, RATIOS, seed="seed").splits
    assert assign_splits(shuffled, {}, RATIOS, seed="seed").splits == a
    assert assign_splits(candidates, {}, RATIOS, seed="other").splits != a


def test_earlier_images_keep_their_split_and_new_ones_fill_the_gaps():
    first = singletons(1, 0, 20)
    before = assign_splits(first, {}, RATIOS, seed="seed").splits
    grown = first + singletons(1, 100, 20)
    after = assign_splits(grown, before, RATIOS, seed="seed")
    assert all(after.splits[s] == split for s, split in before.items())
    assert after.kept == 20 and after.new == 20 and after.moved == []
    counts = Counter(after.splits.values())
    assert counts == Counter({"train": 28, "val": 6, "test": 6})


def test_planted_near_duplicate_clusters_never_span_two_splits():
    rng = random.Random(11)
    candidates = []
    for cluster in range(300):
        size = rng.choice([1, 1, 2, 3, 5])
        product = rng.randrange(12)
        for k in range(size):
            # a few clusters span two products (the same photo posted under two products)
            p = product if k == 0 or rng.random() > 0.1 else (product + 1) % 12
            candidates.append(SplitCandidate(sha(cluster * 10 + k), p, sha(cluster * 10)))
    result = assign_splits(candidates, {}, RATIOS, seed="seed")
    assert clusters_spanning_splits((c.cluster_id, result.splits[c.sha256]) for c in candidates) == {}
    assert set(result.splits.values()) == {"train", "val", "test"}


def test_a_merged_cluster_takes_its_majority_split_and_reports_the_moves():
    a, b, c = sha(1), sha(2), sha(3)
    previous = {a: "train", b: "train", c: "test"}
    merged = [SplitCandidate(s, 1, "cluster") for s in (a, b, c)]
    result = assign_splits(merged, previous, RATIOS, seed="seed")
    assert {result.splits[s] for s in (a, b, c)} == {"train"}
    assert result.moved == [(c, "test", "train")]


def test_a_new_image_follows_its_clusters_earlier_split():
    # dedup chose a new representative; the old one (in test before) is a duplicate now
    newcomer = SplitCandidate(sha(9), 1, "cluster")
    result = assign_splits([newcomer], {}, RATIOS, seed="seed",
                           cluster_history={"cluster": {"test": 1}})
    assert result.splits[newcomer.sha256] == "test"
    assert result.inherited == 1

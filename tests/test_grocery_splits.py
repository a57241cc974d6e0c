"""How benchmarks/train_grocery.py splits the grocery photos: which photos each fit trains on and
which it is tested on. File names only; no photo is read and nothing is trained."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from benchmark_modules import load_benchmark

train_grocery = load_benchmark("train_grocery")


def grocery_like(products: int = 3, train_per_product: int = 20, val_per_product: int = 5):
    photos = []
    for label in range(products):
        for folder, n in (("train", train_per_product), ("val", val_per_product)):
            photos += [(Path(f"/g/{folder}/P{label}/P{label}_{i:03d}.jpg"), label)
                       for i in range(1, n + 1)]
    return photos


def by_split(split):
    out = {}
    for path, _, s in split:
        out.setdefault(s, set()).add(path)
    return out


@pytest.mark.parametrize("carve", ["random", "sessions"])
def test_val_halves_tests_both_arms_on_the_later_half_of_each_products_val_photos(carve):
    photos = grocery_like()
    unused = train_grocery.val_halves_holdout(photos, 7, "unused", carve=carve)
    trained = train_grocery.val_halves_holdout(photos, 7, "train", carve=carve)
    a, b = by_split(unused), by_split(trained)

    assert a["test"] == b["test"]
    assert a["val"] == b["val"] and all("/train/" in str(p) for p in a["val"])
    earlier = {p for p, _ in photos if "/val/" in str(p) and int(p.stem[-3:]) <= 2}
    later = {p for p, _ in photos if "/val/" in str(p) and int(p.stem[-3:]) > 2}
    assert a["test"] == later
    assert not earlier & (a["train"] | a["val"] | a["test"])
    assert b["train"] == a["train"] | earlier
    for split in (unused, trained):
        assert max(Counter(p for p, _, _ in split).values()) == 1  # no photo in two splits


def test_val_halves_refuses_an_unknown_choice_for_the_earlier_half():
    with pytest.raises(ValueError, match="unused or train"):
        train_grocery.val_halves_holdout(grocery_like(), 7, "test")


def test_the_fit_on_all_photos_trains_on_everything_but_the_val_carve():
    photos = grocery_like()
    measured = train_grocery.official_val_holdout(photos, 7, carve="sessions")
    refit = by_split(train_grocery.refit_split(photos, measured))
    carved = by_split(measured)["val"]

    assert refit["val"] == carved == refit["test"]  # the test repeats val: nothing is held out
    assert refit["train"] == {p for p, _ in photos} - carved
    assert by_split(measured)["test"] <= refit["train"]  # the measured fit's test photos now train


@pytest.mark.parametrize("argv, export_fit", [
    ([], "all"),  # the default run exports the ensemble to deploy, trained on val/ too
    (["--holdout", "official-val", "--export-fit", "evaluated"], "evaluated"),
    (["--holdout", "val-halves"], "evaluated"),  # experiments export what they measured
    (["--holdout", "random"], "evaluated"),
    (["--holdout", "val-halves", "--export-fit", "all"], "all"),
])
def test_which_fit_is_exported_by_default_depends_on_the_holdout(argv, export_fit):
    assert train_grocery.parse_args(argv).export_fit == export_fit

"""The seen-only model selection benchmark (benchmarks/search_grocery_select.py): its fast
Gram-space whitening must give the product's learned whitening's embeddings, and its rule must
pick by the seen-products cross-validation alone."""
from __future__ import annotations

import numpy as np
import pytest

from benchmark_modules import load_benchmark
from shoplens.vision.embedding import learned_whitening

select = load_benchmark("search_grocery_select")
choose, cv_splits, embed_features, l2 = (select.choose, select.cv_splits, select.embed_features,
                                         select.l2)


def _pooled(rng, labels, width):
    """Non-negative pooled features with a per-product part, for a plain and a mirrored view."""
    per_product = np.abs(rng.normal(size=(labels.max() + 1, width)))[labels] * 2
    plain = per_product + np.abs(rng.normal(size=(len(labels), width)))
    return {"gem3": {"plain": plain.astype(np.float32),
                     "flip": (plain + np.abs(rng.normal(size=plain.shape)) * 0.5).astype(np.float32)}}


@pytest.mark.parametrize("backbones,flip", [(1, False), (1, True), (2, True)])
def test_gram_space_whitening_gives_the_learned_whitenings_cosines(backbones, flip):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(30), 10)
    parts = [_pooled(rng, labels, width) for width in (200, 150)[:backbones]]
    fit = np.flatnonzero(labels < 12)
    x = embed_features(parts, "gem3", flip)
    coords, fit_coords = select.fit_coordinates(select.unit_gram(parts, "gem3", flip, {}), fit)
    basis = select.whitening_basis(fit_coords, labels[fit], x.shape[1])
    projection = select.whitening_projections(basis, [0.5], [40])[(0.5, 40)]
    fast = l2(coords @ projection)
    w = learned_whitening(x[fit], labels[fit], 40, 0.5)
    exact = l2((l2(x) - w["mean"]) @ w["projection"])
    np.testing.assert_allclose(fast @ fast.T, exact @ exact.T, atol=2e-4)


@pytest.mark.parametrize("backbones", [1, 2])
def test_a_whitening_fitted_with_mirror_images_is_the_learned_whitening_of_photos_and_mirrors(
        backbones):
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(30), 10)
    parts = [_pooled(rng, labels, width) for width in (200, 150)[:backbones]]
    fit, n = np.flatnonzero(labels < 12), len(labels)
    gram = select.mirrored_unit_gram(parts, "gem3")
    rows = np.concatenate([fit, fit + n])
    coords, fit_coords = select.fit_coordinates(gram, rows)
    plain = embed_features(parts, "gem3", False)
    basis = select.whitening_basis(fit_coords, labels[rows % n], plain.shape[1])
    projection = select.whitening_projections(basis, [0.5], [40])[(0.5, 40)]
    fast = l2(coords[:n] @ projection)
    mirrors = embed_features([{"gem3": {"plain": p["gem3"]["flip"]}} for p in parts], "gem3",
                             False)
    w = learned_whitening(np.concatenate([plain[fit], mirrors[fit]]),
                          np.concatenate([labels[fit], labels[fit]]), 40, 0.5)
    exact = l2((l2(plain) - w["mean"]) @ w["projection"])
    np.testing.assert_allclose(fast @ fast.T, exact @ exact.T, atol=2e-4)
    # and it is not the whitening of the photos alone
    alone = learned_whitening(plain[fit], labels[fit], 40, 0.5)
    other = l2((l2(plain) - alone["mean"]) @ alone["projection"])
    assert np.abs(other @ other.T - exact @ exact.T).max() > 1e-2


def test_splits_halve_the_seen_products_both_ways_and_repeat_with_the_seed():
    seen = list(range(0, 82, 2))
    folds = cv_splits(seen, 3, seed=7)
    assert len(folds) == 6 and folds == cv_splits(seen, 3, seed=7)
    for fit_on, ask in folds:
        assert sorted(fit_on + ask) == seen and abs(len(fit_on) - len(ask)) <= 1


def test_the_rule_reads_the_cross_validation_only_and_breaks_ties_by_r3_then_cost():
    def row(cv1, cv3, passes, novel):
        return {"cv": {"R@1": cv1, "R@3": cv3}, "backbone_passes": passes,
                "novel": {"R@1": novel}}

    best_cv = row(0.75, 0.90, 6, novel=0.1)
    assert choose([row(0.70, 0.99, 1, novel=0.9), best_cv]) is best_cv
    assert choose([row(0.75, 0.90, 6, 0), tie := row(0.7504, 0.95, 6, 0)]) is tie
    cheap = row(0.75, 0.95, 1, 0)
    assert choose([row(0.75, 0.95, 6, 0), cheap]) is cheap


def test_a_hub_product_near_other_products_photos_loses_the_queries_it_should_not_win():
    # Products 0, 2 and 3 lie on the three axes; product 1's photos sit between all of them (a
    # hub), so its raw cosine wins a query that leans to product 0; the correction, read from
    # the gallery alone, gives the query back to product 0.
    enrol = l2(np.array([[1.0, 0, 0.05], [1.0, 0.05, 0],             # product 0
                         [0.6, 0.55, 0.55], [0.55, 0.6, 0.55],       # product 1, the hub
                         [0, 1.0, 0.05], [0.05, 1.0, 0],             # product 2
                         [0, 0.05, 1.0], [0.05, 0, 1.0]]))           # product 3
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    query, truth = l2(np.array([[0.85, 0.4, 0.35]])), np.array([0])
    plain_r1, _, _ = select.recalls(query, truth, enrol, labels)
    fixed_r1, _, _ = select.recalls(query, truth, enrol, labels, hub=(6, 1.0))
    assert (plain_r1, fixed_r1) == (0.0, 1.0)
    assert select.recalls(query, truth, enrol, labels, hub=(6, 0.0))[0] == plain_r1


def test_hubness_counts_only_other_products_photos():
    enrol = l2(np.array([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.6, 0.8]]))
    pos = np.array([0, 0, 1, 1])
    protos = l2(np.array([[1.0, 0.05], [0.3, 0.9]]))
    h = select.hubness(protos, enrol, pos, k=1)
    np.testing.assert_allclose(h, [max(protos[0] @ enrol[2], protos[0] @ enrol[3]),
                                   max(protos[1] @ enrol[0], protos[1] @ enrol[1])], rtol=1e-6)


def test_every_candidate_gets_its_hubness_copies_after_it_at_the_same_query_cost():
    rows = select.candidates(["lite2"], [256], [0.5], hubs=((10, 0.5), (10, 1.0)))
    plain = [r for r in rows if "hubness" not in r]
    assert len(rows) == 3 * len(plain)
    for i, r in enumerate(rows):
        if "hubness" in r:
            base = rows[i - 1] if rows[i - 1].get("hubness") is None else rows[i - 2]
            assert {k: v for k, v in r.items() if k != "hubness"} == base
    assert select.parse_hubs("10:0.5,5:1") == ((10, 0.5), (5, 1.0))

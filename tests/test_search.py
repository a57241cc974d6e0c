"""Product search (issue 16): the metric-learning embedding, the faiss index over every enrolled
photo, the calibrated "no confident match" threshold and the ``search`` command line.

Everything runs on generated data: feature vectors for the embedding head and the index, and
small drawn photos (random-initialised backbone at 32 px) for the end-to-end paths."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from modeling import search_index
from drawn_products import SHAPES, drawn_photo
from modeling.embedding import (Embedder, HeadTraining, finetune_embedding, l2_normalise,
                                train_embedding, train_head)
from modeling.search_index import (CONFIDENCE_RULES, SearchIndex, SearchIndexError,
                                   calibrate_confidence, calibrate_threshold, confidence_values,
                                   threshold_outcome)
from shoplens.config import Settings


# --- the embedding ------------------------------------------------------------------------------
def _toy_features(classes, per_class, rng):
    """Features whose product identity lives in 8 weak dimensions, drowned by 56 loud ones that
    vary per photo (lighting, background): cosine on the raw features mostly sees the noise."""
    centres = {c: rng.normal(0, 1.0, 8) for c in classes}
    rows, labels = [], []
    for c in classes:
        for _ in range(per_class):
            identity = centres[c] + rng.normal(0, 0.15, 8)
            nuisance = rng.normal(0, 3.0, 56)
            rows.append(np.concatenate([identity, nuisance]) + 4.0)  # non-negative, like ReLU6
            labels.append(c)
    return np.array(rows, np.float32), np.array(labels)


def _nearest_neighbour_recall(vectors, labels) -> float:
    sims = vectors @ vectors.T
    np.fill_diagonal(sims, -np.inf)
    return float(np.mean(labels[sims.argmax(1)] == labels))


def test_metric_learning_head_finds_unseen_products_that_the_untrained_embedding_confuses():
    """Trained on some products, the projection learns which feature directions tell products
    apart, so photos of products it never saw are matched far better than by raw cosine."""
    rng = np.random.default_rng(0)
    seen_x, seen_y = _toy_features(range(12), 40, rng)
    novel_x, novel_y = _toy_features(range(100, 112), 10, rng)
    head, report = train_head(seen_x, seen_y, HeadTraining(dim=16, epochs=40, seed=1))
    assert head["kernel"].shape == (64, 16) and report["classes"] == 12

    untrained = _nearest_neighbour_recall(l2_normalise(novel_x), novel_y)
    trained = _nearest_neighbour_recall(l2_normalise(novel_x @ head["kernel"] + head["bias"]),
                                        novel_y)
    assert trained >= untrained + 0.3, (untrained, trained)


def test_metric_learning_needs_at_least_two_products():
    with pytest.raises(ValueError, match="at least 2 products"):
        train_head(np.ones((4, 8), np.float32), np.zeros(4))


# --- the threshold ------------------------------------------------------------------------------
def test_threshold_is_the_lowest_score_keeping_the_target_precision():
    """Precision of answering everything at or above each score: 1, 1, 2/3, 3/4, 3/5 -> the
    lowest cut still at 0.75 is 0.6, answering 4 of the 5 queries."""
    chosen = calibrate_threshold([0.9, 0.5, 0.7, 0.6, 0.8], [True, False, False, True, True], 0.75)
    assert chosen["threshold"] == pytest.approx(0.6)
    assert chosen["precision"] == pytest.approx(0.75)
    assert chosen["coverage"] == pytest.approx(0.8)


def test_threshold_never_splits_equal_scores():
    """A threshold answers every query at its score, so a tie group is kept or dropped whole."""
    chosen = calibrate_threshold([0.9, 0.6, 0.6, 0.6], [True, True, False, False], 0.9)
    assert chosen["threshold"] == pytest.approx(0.9) and chosen["answered"] == 1


def test_threshold_answers_nothing_when_no_cut_reaches_the_target():
    chosen = calibrate_threshold([0.9, 0.8], [False, True], 0.95)
    assert chosen["answered"] == 0 and chosen["precision"] is None
    assert threshold_outcome([0.9, 0.8], [False, True], chosen["threshold"])["answered"] == 0


# --- the index over vectors ---------------------------------------------------------------------
def _vector_embedder(dim=8) -> Embedder:
    """An embedder whose head is the identity: vectors given to the index are used as they are
    (the backbone is never built)."""
    return Embedder("efficientnet_lite0", 32, {"kernel": np.eye(dim, dtype=np.float32),
                                               "bias": np.zeros(dim, np.float32)})


def _catalogue(index: SearchIndex, n_products=5, photos=4, seed=0, first_id=100):
    """n products, each with photos scattered around its own direction; returns the directions."""
    rng = np.random.default_rng(seed)
    dirs = l2_normalise(rng.normal(size=(n_products, index.dim)))
    index.add_products([{"product_id": first_id + p, "name": f"product {p}"}
                        for p in range(n_products)])
    vecs, pids, srcs = [], [], []
    for p in range(n_products):
        for j in range(photos):
            vecs.append(dirs[p] + rng.normal(0, 0.1, index.dim))
            pids.append(first_id + p)
            srcs.append(f"photo-{first_id + p}-{j}")
    index.add_vectors(np.array(vecs), pids, srcs)
    return dirs


@pytest.mark.parametrize("aggregation", ["max", "prototype"])
def test_index_ranks_products_not_photos(aggregation):
    """A query near a product's photos gets that product first, each product listed once, with
    cosine scores in decreasing order."""
    index = SearchIndex(_vector_embedder(), aggregation)
    dirs = _catalogue(index)
    hits = index.search_vectors(dirs[[2, 4]], k=3)
    assert [h[0].product_id for h in hits] == [102, 104]
    for top in hits:
        assert len({h.product_id for h in top}) == 3
        assert [h.score for h in top] == sorted((h.score for h in top), reverse=True)
        assert -1.0 <= top[-1].score <= top[0].score <= 1.0 + 1e-6
    assert hits[0][0].name == "product 2"


def test_index_refuses_vectors_of_unregistered_products_and_wrong_width():
    index = SearchIndex(_vector_embedder())
    with pytest.raises(SearchIndexError, match="not registered"):
        index.add_vectors(np.ones((1, 8)), [5], ["a"])
    index.add_products([{"product_id": 5, "name": "five"}])
    with pytest.raises(SearchIndexError, match=r"\(n, 8\)"):
        index.add_vectors(np.ones((1, 4)), [5], ["a"])
    assert len(index) == 0


@pytest.mark.parametrize("rule", ["top1", "combined"])
def test_answers_below_the_calibrated_threshold_are_not_confident(rule):
    """Calibrated on clear photos and photos of nothing enrolled, the rules that look at the
    best score do not answer a photo far from every product (the margin alone may: see below)."""
    index = SearchIndex(_vector_embedder())
    dirs = _catalogue(index)
    assert index.answer(dirs[0])["confident"] is False  # never calibrated: nothing is confident
    rng = np.random.default_rng(3)
    queries = np.concatenate([dirs + rng.normal(0, 0.05, dirs.shape),   # clear photos
                              rng.normal(size=(5, index.dim))])          # unrelated photos
    truth = [100 + p for p in range(5)] + [100 + p for p in range(5)]
    chosen = index.calibrate(queries, truth, 0.95, rule=rule)
    assert chosen["precision"] >= 0.95
    assert index.answer(dirs[1])["confident"] is True
    below = index.answer(-dirs[1])  # far from every product: still ranked, but not confident
    assert below["top"] and below["confident"] is False


def test_saved_index_loads_and_answers_the_same(tmp_path):
    index = SearchIndex(_vector_embedder(), "max")
    dirs = _catalogue(index)
    index.calibrate(dirs, [100 + p for p in range(5)])
    index.save(tmp_path / "idx")
    loaded = SearchIndex.load(tmp_path / "idx")
    assert len(loaded) == len(index) == 20
    assert loaded.threshold == index.threshold and loaded.aggregation == "max"
    for q in dirs:
        assert loaded.answer(q) == index.answer(q)


# --- the confidence rule ------------------------------------------------------------------------
def _twins_and_singles(index: SearchIndex, rng, photos=6):
    """Products 100 and 101 look alike (directions ~0.04 apart); 102-105 are each on their own.
    Returns the products' directions."""
    dirs = l2_normalise(rng.normal(size=(6, index.dim)))
    dirs[1] = l2_normalise(dirs[0] + rng.normal(0, 0.01, index.dim))
    index.add_products([{"product_id": 100 + p, "name": f"product {p}"} for p in range(6)])
    vecs = [dirs[p] + rng.normal(0, 0.03, index.dim) for p in range(6) for _ in range(photos)]
    index.add_vectors(np.array(vecs), [100 + p for p in range(6) for _ in range(photos)],
                      [f"photo-{p}-{j}" for p in range(6) for j in range(photos)])
    return dirs


def _queries_around(dirs, rng, per_product=16, spread=0.1):
    queries = np.repeat(dirs, per_product, axis=0) + rng.normal(0, spread, (len(dirs) * per_product,
                                                                           dirs.shape[1]))
    return queries, [100 + p for p in range(len(dirs)) for _ in range(per_product)]


def test_the_margin_rule_abstains_between_look_alike_products_even_with_a_high_top1():
    """Photos of two near-identical products score high on both: the best score says "sure",
    the runner-up only a hair below says "could be either"; a product on its own is answered."""
    rng = np.random.default_rng(0)
    index = SearchIndex(_vector_embedder(16))
    dirs = _twins_and_singles(index, rng)
    queries, truth = _queries_around(dirs, rng)
    chosen = index.calibrate(queries, truth, 0.95, rule="margin")
    assert chosen["rule"] == "margin" and chosen["precision"] >= 0.95

    twin = index.answer(dirs[0])
    assert twin["top"][0]["score"] > 0.95 and twin["top"][1]["product_id"] == 101
    assert twin["confident"] is False
    assert twin["confidence"]["rule"] == "margin"
    assert twin["confidence"]["value"] < twin["confidence"]["cut"]
    single = index.answer(dirs[3])
    assert single["top"][0]["product_id"] == 103 and single["confident"] is True
    assert single["confidence"]["value"] >= single["confidence"]["cut"]


def test_the_combined_rule_abstains_on_look_alikes_and_on_photos_unlike_every_product():
    """Fitted on queries that include photos of nothing enrolled (low best score) and photos of
    the look-alikes (high best score, no lead), the combined rule answers only the clear ones."""
    rng = np.random.default_rng(1)
    index = SearchIndex(_vector_embedder(16))
    dirs = _twins_and_singles(index, rng)
    queries, truth = _queries_around(dirs, rng)
    strangers = rng.normal(size=(24, index.dim))  # labelled with a product they are not
    index.calibrate(np.concatenate([queries, strangers]), truth + [100 + i % 6 for i in range(24)],
                    0.99, rule="combined")
    assert index.threshold["rule"] == "combined" and len(index.threshold["weights"]) == 3
    assert index.answer(dirs[4])["confident"] is True
    assert index.answer(dirs[0])["confident"] is False
    assert not any(index.answer(q)["confident"] for q in rng.normal(size=(10, index.dim)))


@pytest.mark.parametrize("rule", CONFIDENCE_RULES)
def test_calibration_picks_the_lowest_cut_keeping_the_target_precision(rule):
    """Wrong answers have small margins and middling scores: whatever the rule, its cut keeps
    the target precision on the calibration queries, and the next lower value would not."""
    rng = np.random.default_rng(2)
    correct = rng.random(400) < 0.7
    s1 = np.where(correct, rng.uniform(0.5, 0.95, 400), rng.uniform(0.4, 0.8, 400))
    s2 = s1 - np.where(correct, rng.uniform(0.0, 0.3, 400), rng.uniform(0.0, 0.08, 400))
    chosen = calibrate_confidence(s1, s2, correct, 0.95, rule)
    values = confidence_values(rule, s1, s2, chosen["weights"])
    kept = threshold_outcome(values, correct, chosen["cut"])
    assert kept["precision"] >= 0.95 and kept["answered"] == chosen["answered"] > 0
    lower = values[values < chosen["cut"]].max()
    assert threshold_outcome(values, correct, lower)["precision"] < 0.95
    assert set(chosen["rules"]) == set(CONFIDENCE_RULES)
    assert chosen["threshold"] == chosen["rules"]["top1"]["cut"]  # the top-1 cut, always


def test_the_same_calibration_queries_in_another_order_give_the_same_rule_to_the_last_bit():
    """An incremental refresh and a full rebuild hold their vectors in different orders, so
    their leave-one-out queries come in different orders: the fitted weights and cut must not
    depend on it (float sums in another order differ in the last bits)."""
    rng = np.random.default_rng(4)
    correct = rng.random(3000) < 0.7
    s1 = np.where(correct, rng.uniform(0.5, 0.95, 3000), rng.uniform(0.4, 0.8, 3000))
    s2 = s1 - rng.uniform(0.0, 0.2, 3000)
    shuffled = rng.permutation(3000)
    first = calibrate_confidence(s1, s2, correct, 0.95, "combined")
    again = calibrate_confidence(s1[shuffled], s2[shuffled], correct[shuffled], 0.95, "combined")
    assert again == first


def test_leave_one_out_calibration_fits_the_rule_on_the_enrolled_photos():
    """Each enrolled photo queries the index without itself: the twins' photos are the only
    wrong or close answers, and the margin rule's cut keeps the target on those queries."""
    rng = np.random.default_rng(3)
    index = SearchIndex(_vector_embedder(16))
    _twins_and_singles(index, rng, photos=10)
    chosen = index.calibrate_leave_one_out(0.95, rule="margin")
    assert chosen["queries"] == 60 and chosen["method"] == "leave-one-out"
    assert chosen["rule"] == "margin" and chosen["precision"] >= 0.95
    # the four products on their own are always right, by a wide margin: all of them answered
    assert chosen["answered"] >= 40


def test_the_calibration_holdout_leaves_a_photos_near_duplicates_out_of_its_product():
    """Each product's photos come from two sessions of near-identical shots: left out alone, a
    photo still finds its session twins in its product's prototype; with half its product's
    photos most like it left out, it is judged against the other session only, as a customer's
    photo from another day would be. Products with two photos keep one (never all)."""
    rng = np.random.default_rng(4)
    index = SearchIndex(_vector_embedder(16))
    sessions = l2_normalise(rng.normal(size=(8, index.dim)))
    index.add_products([{"product_id": 100 + p, "name": f"product {p}"} for p in range(5)])
    vecs, pids = [], []
    for p in range(4):  # products 100-103: two sessions of 5 shots each
        for session in (2 * p, 2 * p + 1):
            vecs += [sessions[session] + rng.normal(0, 0.01, index.dim) for _ in range(5)]
            pids += [100 + p] * 5
    vecs += [rng.normal(size=index.dim) for _ in range(2)]  # product 104: two photos
    pids += [104, 104]
    index.add_vectors(np.array(vecs), pids, [f"photo-{i}" for i in range(len(vecs))])

    alone = index.leave_one_out_outcomes(holdout=0.0)
    half = index.leave_one_out_outcomes(holdout=0.5)
    assert len(alone[0]) == len(half[0]) == 42
    own_session = (alone[0][:40] - half[0][:40])
    assert np.all(own_session > 0.1)  # the twins made the best score far higher
    with pytest.raises(ValueError, match="holdout"):
        index.leave_one_out_outcomes(holdout=1.0)


def _leave_one_out_by_definition(index, holdout):
    """The prototype leave-one-out, one query at a time, exactly as its docstring defines it:
    the query's product prototype without the query and the ``holdout`` fraction of its
    product's photos most like it, against every other product's prototype."""
    vecs = index._vectors.astype(np.float64)
    pids = index._product_ids
    products = sorted(set(pids.tolist()))
    protos = {p: l2_normalise(vecs[pids == p].sum(0)) for p in products}
    s1, s2, correct = [], [], []
    for row in range(len(pids)):
        mine = np.flatnonzero(pids == pids[row])
        n = min(len(mine) - 1, max(1, int(holdout * len(mine))))
        others_of_mine = [r for r in mine[np.argsort(-(vecs[mine] @ vecs[row]), kind="stable")]
                          if r != row]
        left_out = [row, *others_of_mine[:n - 1]]
        own = float(l2_normalise(vecs[mine].sum(0) - vecs[left_out].sum(0)) @ vecs[row])
        others = sorted((float(protos[p] @ vecs[row]) for p in products if p != pids[row]),
                        reverse=True)
        ranked = sorted([own, *others], reverse=True)
        s1.append(ranked[0])
        s2.append(ranked[1])
        correct.append(own >= others[0])
    return np.array(s1), np.array(s2), np.array(correct)


@pytest.mark.parametrize("holdout", [0.0, 0.3, 0.5])
def test_leave_one_out_outcomes_are_those_of_its_per_query_definition(holdout):
    """The calibration is computed a product at a time; each query's best and runner-up scores
    and whether it was right are those of leaving it (and its nearest twins) out by hand."""
    rng = np.random.default_rng(7)
    index = SearchIndex(_vector_embedder(16))
    index.add_products([{"product_id": 100 + p, "name": f"product {p}"} for p in range(6)])
    centres = rng.normal(size=(6, index.dim))
    pids = rng.integers(0, 6, 60)
    pids[:12] = np.repeat(np.arange(6), 2)  # every product has at least two photos
    vecs = centres[pids] + rng.normal(0, 1.2, (60, index.dim))
    index.add_vectors(vecs[:35], 100 + pids[:35], [f"photo-{i}" for i in range(35)])
    index.add_vectors(vecs[35:], 100 + pids[35:], [f"photo-{i}" for i in range(35, 60)])

    s1, s2, correct = index.leave_one_out_outcomes(holdout=holdout)
    want_s1, want_s2, want_correct = _leave_one_out_by_definition(index, holdout)
    assert correct.tolist() == want_correct.tolist()
    assert 0 < correct.mean() < 1  # both kinds of outcome are compared
    np.testing.assert_allclose(s1, want_s1, atol=1e-5)
    np.testing.assert_allclose(s2, want_s2, atol=1e-5)


def test_an_index_saved_before_the_confidence_rules_still_loads_and_cuts_the_top1_score(tmp_path):
    index = SearchIndex(_vector_embedder())
    dirs = _catalogue(index)
    index.save(tmp_path / "idx")
    config = json.loads((tmp_path / "idx" / "index.json").read_text())
    best = [index.search_vectors(q, 1)[0][0].score for q in dirs[:2]]
    config["threshold"] = {"threshold": float(np.mean(best)), "target_precision": 0.95,
                           "precision": 1.0, "coverage": 0.5, "answered": 1, "queries": 2}
    (tmp_path / "idx" / "index.json").write_text(json.dumps(config))

    loaded = SearchIndex.load(tmp_path / "idx")
    above, below = (loaded.answer(dirs[i]) for i in np.argsort(best)[::-1])
    assert above["confident"] is True and below["confident"] is False
    assert above["confidence"]["rule"] == "top1"
    assert above["confidence"]["cut"] == pytest.approx(np.mean(best), abs=1e-4)


def test_the_confidence_rule_setting_is_checked():
    from shoplens.config import ConfigError

    assert Settings().search_confidence_rule == "combined"
    with pytest.raises(ConfigError, match="search_confidence_rule"):
        Settings(search_confidence_rule="top2").validate()


def test_extending_a_saved_index_embeds_and_writes_only_the_new_photos(tmp_path):
    """A product added tonight becomes searchable: its photos go into one new chunk; the old
    chunk is not rewritten and photos already enrolled are skipped."""
    root = tmp_path / "idx"
    index = SearchIndex(_vector_embedder())
    _catalogue(index)
    index.save(root)
    old_chunk = root / "chunks" / "000000.npz"
    before = old_chunk.stat().st_mtime_ns, old_chunk.read_bytes()

    tonight = SearchIndex.load(root)
    new_dir = _catalogue(tonight, n_products=1, photos=3, seed=9, first_id=900)[0]
    again = tonight.add_vectors(np.ones((1, 8)), [100], ["photo-100-0"])  # already enrolled
    assert again == 0
    tonight.save(root)

    assert sorted(p.name for p in (root / "chunks").glob("*.npz")) == ["000000.npz", "000001.npz"]
    assert (old_chunk.stat().st_mtime_ns, old_chunk.read_bytes()) == before
    reloaded = SearchIndex.load(root)
    assert len(reloaded) == 23
    assert reloaded.search_vectors(new_dir, 1)[0][0].product_id == 900
    # The exact ANN is the vectors themselves: not stored, rebuilt from the chunks on load.
    assert list(root.glob("ann-*.faiss")) == [] and reloaded.config()["ann"] == "Flat"


def test_photos_added_in_many_batches_are_saved_as_few_chunks_in_their_order(monkeypatch,
                                                                               tmp_path):
    """A refresh adds one embedding batch at a time: what was added since the last save is
    written as one chunk (of at most CHUNK_VECTORS vectors, here 5), the saved chunks are left
    as they are, and the index answers as the same photos added at once."""
    monkeypatch.setattr(search_index, "CHUNK_VECTORS", 5)
    rng = np.random.default_rng(3)
    vecs = l2_normalise(rng.normal(size=(16, 8)))
    pids = [100 + i % 4 for i in range(16)]
    products = [{"product_id": 100 + p, "name": f"product {p}"} for p in range(4)]
    at_once, in_batches = SearchIndex(_vector_embedder()), SearchIndex(_vector_embedder())
    for index in (at_once, in_batches):
        index.add_products(products)
    at_once.add_vectors(vecs, pids, [f"p{i}" for i in range(16)])
    for i in range(0, 4):  # four of one each, saved: one chunk
        in_batches.add_vectors(vecs[i:i + 1], pids[i:i + 1], [f"p{i}"])
    in_batches.save(tmp_path / "idx")
    for i in range(4, 16, 2):  # six of two each: chunks of 4, 4 and 4 after the saved one
        in_batches.add_vectors(vecs[i:i + 2], pids[i:i + 2], [f"p{i}", f"p{i + 1}"])
    assert len(in_batches) == 16
    in_batches.save(tmp_path / "idx")

    saved = json.loads((tmp_path / "idx" / "index.json").read_text())["chunks"]
    sizes = [len(np.load(tmp_path / "idx" / "chunks" / name)["sources"]) for name in saved]
    assert sizes == [4, 4, 4, 4]
    loaded = SearchIndex.load(tmp_path / "idx")
    assert loaded.sources() == [f"p{i}" for i in range(16)]
    np.testing.assert_array_equal(loaded._vectors, at_once._vectors)  # noqa: SLF001
    assert loaded.search_vectors(vecs, 3) == at_once.search_vectors(vecs, 3)


def test_a_night_after_many_is_saved_with_its_small_chunks_compacted(monkeypatch, tmp_path):
    """Each night adds a chunk; past COMPACT_ABOVE_CHUNKS (here 4) a save rewrites the chunks
    under a quarter of CHUNK_VECTORS (here 8: under 2 vectors) as few, in order, and deletes
    the files it replaced; a reader of the saved folder sees every vector as before."""
    monkeypatch.setattr(search_index, "CHUNK_VECTORS", 8)
    monkeypatch.setattr(search_index, "COMPACT_ABOVE_CHUNKS", 4)
    root = tmp_path / "idx"
    index = SearchIndex(_vector_embedder())
    index.add_products([{"product_id": 100, "name": "a"}, {"product_id": 101, "name": "b"}])
    rng = np.random.default_rng(5)
    vecs = l2_normalise(rng.normal(size=(8, 8)))
    index.add_vectors(vecs[:3], [100, 101, 100], ["s0", "s1", "s2"])  # a first build: 3 vectors
    index.save(root)
    for night in range(3, 6):  # three nights of one photo: 4 chunks
        index = SearchIndex.load(root)
        index.add_vectors(vecs[night:night + 1], [100 + night % 2], [f"s{night}"])
        index.save(root)
    assert len(list((root / "chunks").glob("*.npz"))) == 4

    index = SearchIndex.load(root)  # the fifth chunk: compaction
    index.add_vectors(vecs[6:8], [100, 101], ["s6", "s7"])
    index.save(root)
    listed = json.loads((root / "index.json").read_text())["chunks"]
    assert sorted(p.name for p in (root / "chunks").glob("*.npz")) == sorted(listed)
    assert [len(np.load(root / "chunks" / n)["sources"]) for n in listed] == [3, 5]
    reloaded = SearchIndex.load(root)
    assert reloaded.sources() == [f"s{i}" for i in range(8)]
    np.testing.assert_array_equal(reloaded._vectors, vecs.astype(np.float16))  # noqa: SLF001


def test_product_sums_are_the_exact_float64_sums_in_any_row_order():
    """Each product's sum of its stored (float16, unit-length) vectors, to the last bit,
    however the rows are ordered; a product without rows sums to zero."""
    rng = np.random.default_rng(11)
    vectors = l2_normalise(rng.normal(size=(300, 16))).astype(np.float16)
    positions = rng.integers(0, 7, size=300)
    positions[positions == 5] = 6  # position 5 has no row
    by_definition = np.zeros((8, 16), np.float64)
    for row, position in zip(vectors, positions):
        by_definition[position] += row.astype(np.float64)
    np.testing.assert_array_equal(search_index.product_sums(positions, vectors, 8), by_definition)
    shuffled = rng.permutation(300)
    np.testing.assert_array_equal(
        search_index.product_sums(positions[shuffled], vectors[shuffled], 8), by_definition)
    assert not search_index.product_sums(positions, vectors, 8)[5].any()
    assert search_index.product_sums(positions[:0], vectors[:0], 2).shape == (2, 16)


def test_a_max_index_moves_to_an_ivf_structure_when_it_outgrows_exact_search(monkeypatch,
                                                                            tmp_path):
    """Max aggregation searches photos: crossing the size limit rebuilds its photo ANN from the
    stored vectors (nothing re-embedded); results stay right, and the IVF structure is what is
    saved, read back and extended by later additions instead of trained again."""
    monkeypatch.setattr(search_index, "EXACT_BELOW", 100)
    index = SearchIndex(_vector_embedder(), aggregation="max", nprobe=64)
    dirs = _catalogue(index, n_products=10, photos=5)
    assert index.config()["ann"] == "Flat"
    assert [h[0].product_id for h in index.search_vectors(dirs[:1], 1)] == [100]
    _catalogue(index, n_products=10, photos=30, seed=1, first_id=500)
    assert index.config()["ann"].startswith("IVF")
    index.save(tmp_path / "idx")
    stored = [p.name for p in (tmp_path / "idx").glob("ann-*.faiss")]
    assert stored == [f"ann-{len(index)}.faiss"]  # trained: saved, not rebuilt on load

    loaded = SearchIndex.load(tmp_path / "idx")
    assert loaded.config()["ann"].startswith("IVF")
    _catalogue(loaded, n_products=2, photos=5, seed=2, first_id=900)  # a night's new photos
    built = []
    real = search_index.build_ann
    monkeypatch.setattr(search_index, "build_ann", lambda *a, **k: built.append(1) or real(*a, **k))
    assert [h[0].product_id for h in loaded.search_vectors(dirs[:3], 1)] == [100, 101, 102]
    assert built == []


def test_a_prototype_index_never_makes_a_photo_ann(monkeypatch, tmp_path):
    """Prototype aggregation searches one vector per product: an index of any size builds,
    stores and reads no structure over its photos (above the exact limit that would be an IVF
    training per refresh for nothing)."""
    monkeypatch.setattr(search_index, "EXACT_BELOW", 100)
    index = SearchIndex(_vector_embedder(), nprobe=64)
    dirs = _catalogue(index, n_products=10, photos=35)
    assert [h[0].product_id for h in index.search_vectors(dirs[:3], 1)] == [100, 101, 102]
    index.calibrate_leave_one_out()
    index.save(tmp_path / "idx")
    assert index._ann is None and list((tmp_path / "idx").glob("ann-*.faiss")) == []
    loaded = SearchIndex.load(tmp_path / "idx")
    assert [h[0].product_id for h in loaded.search_vectors(dirs[:3], 1)] == [100, 101, 102]
    assert loaded._ann is None


def test_loading_something_that_is_not_an_index_says_what_is_missing(tmp_path):
    with pytest.raises(SearchIndexError, match="index.json missing"):
        SearchIndex.load(tmp_path)


# --- photos end to end: embedder, index, command line -------------------------------------------


_photo = drawn_photo


@pytest.fixture(scope="module")
def photo_index(tmp_path_factory):
    """A calibrated index over drawn photos of 4 products, saved, and the photo files."""
    root = tmp_path_factory.mktemp("search")
    settings = Settings().with_overrides(model_init="random")
    base = Embedder("efficientnet_lite0", 32, settings=settings)
    photos = {(p, v): _photo(p, v) for p in SHAPES for v in range(3)}
    trained = train_embedding(base, list(photos.values()), [p for p, _ in photos], views=1,
                              cfg=HeadTraining(dim=16, epochs=2))
    index = SearchIndex(trained)
    index.add_products([{"product_id": p, "name": f"{c} {s}"} for p, (c, s) in SHAPES.items()])
    index.add_photos([(img, p, f"p{p}-{v}") for (p, v), img in photos.items()])
    files = []
    for (p, v), img in photos.items():
        files.append(root / f"p{p}-{v}.png")
        img.save(files[-1])
    index.calibrate(index.embedder.embed_decoded(list(photos.values())), [p for p, _ in photos])
    index.save(root / "index")
    return root / "index", files, trained


def test_trained_embedder_saves_and_reloads_to_the_same_vectors(photo_index, tmp_path):
    _, files, trained = photo_index
    assert trained.trained and trained.dim == 16
    trained.save(tmp_path / "emb")
    loaded = Embedder.load(tmp_path / "emb", trained.settings)
    imgs = [Image.open(f).convert("RGB") for f in files[:3]]
    a, b = trained.embed_decoded(imgs), loaded.embed_decoded(imgs)
    np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)


def test_fine_tuned_embedder_changes_its_backbone_and_keeps_it_through_save_and_load(tmp_path):
    """Fine-tuning the top block moves the backbone away from its starting weights (the base
    embedder is left as it was), and a reloaded embedder computes the same vectors."""
    # ImageNet weights: a random-initialised backbone's features are too small to train.
    base = Embedder("efficientnet_lite0", 32, settings=Settings())
    imgs = [_photo(p, v) for p in SHAPES for v in range(2)]
    before = base.model.get_layer("head_conv").get_weights()[0].copy()
    tuned = finetune_embedding(base, imgs, [p for p in SHAPES for _ in range(2)], blocks=1,
                               epochs=2, views=0, cfg=HeadTraining(dim=8, epochs=1))
    assert tuned.tuned_blocks == 1 and tuned.model is not base.model
    assert tuned.report["finetune"]["trainable_backbone_params"] > 0
    np.testing.assert_array_equal(base.model.get_layer("head_conv").get_weights()[0], before)
    assert not np.array_equal(tuned.model.get_layer("head_conv").get_weights()[0], before)
    tuned.save(tmp_path / "emb")
    loaded = Embedder.load(tmp_path / "emb")
    np.testing.assert_allclose(loaded.embed_decoded(imgs), tuned.embed_decoded(imgs), atol=1e-5)


def _run_cli(argv) -> tuple[int, list[dict], str]:
    from modeling import search

    out, err = io.StringIO(), io.StringIO()
    code = search.main(argv, out=out, err=err)
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


def test_search_cli_prints_one_json_line_per_photo_with_scored_products(photo_index):
    index_dir, files, _ = photo_index
    code, lines, _ = _run_cli(["--index", str(index_dir), str(files[0]), str(files[4])])
    assert code == 0
    assert [line["image"] for line in lines] == [str(files[0]), str(files[4])]
    for line in lines:
        assert set(line) == {"image", "top", "confident", "confidence"}
        assert len(line["top"]) == 3 and isinstance(line["confident"], bool)
        assert line["confidence"]["rule"] == "combined"  # the rule the index was calibrated with
        assert set(line["top"][0]) == {"product_id", "name", "score"}
    # An enrolled photo is closest to its own product's prototype.
    assert lines[0]["top"][0]["product_id"] == 1 and 0 < lines[0]["top"][0]["score"] <= 1
    assert lines[1]["top"][0]["product_id"] == 2


def test_search_cli_reports_an_unreadable_photo_on_its_line_and_exits_2(photo_index, tmp_path):
    index_dir, files, _ = photo_index
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a photo")
    code, lines, err = _run_cli(["--index", str(index_dir), str(bad), str(files[0])])
    assert code == 2
    assert lines[0]["image"] == str(bad) and "not a readable image" in lines[0]["error"]
    assert lines[1]["top"][0]["product_id"] == 1  # the good photo is still answered
    assert "1 of 2 photo(s) could not be read" in err


def test_search_cli_refuses_a_directory_that_is_not_an_index(tmp_path):
    photo = tmp_path / "a.png"
    _photo(1, 0).save(photo)
    code, lines, err = _run_cli(["--index", str(tmp_path), str(photo)])
    assert code == 2 and lines == [] and "not a search index" in err


def test_search_is_a_modeling_command(photo_index, capsys):
    from modeling.__main__ import main

    index_dir, files, _ = photo_index
    assert main(["search", "--index", str(index_dir), str(files[8])]) == 0
    line = json.loads(capsys.readouterr().out.splitlines()[0])
    assert line["top"][0]["product_id"] == 3
    assert main(["search", "--index", str(index_dir)]) == 2  # no photo given: usage error


# --- GeM pooling and the learned whitening ------------------------------------------------------
def test_learned_whitening_fitted_on_other_products_finds_novel_products_raw_cosine_confuses():
    """Fitted in closed form on some products' photos, the whitening shrinks the directions
    photos of one product vary along, so photos of products it never saw match far better."""
    from shoplens.vision.embedding import learned_whitening

    rng = np.random.default_rng(0)
    seen_x, seen_y = _toy_features(range(12), 40, rng)
    novel_x, novel_y = _toy_features(range(100, 112), 10, rng)
    w = learned_whitening(seen_x, seen_y, dim=16, regularisation=0.01)
    assert w["projection"].shape == (64, 16) and w["mean"].shape == (64,)
    whitened = Embedder("efficientnet_lite0", 32).with_whitening(w)
    assert whitened.dim == 16 and whitened.feature_dim == 64 and not whitened.trained

    untrained = _nearest_neighbour_recall(l2_normalise(novel_x), novel_y)
    after = _nearest_neighbour_recall(whitened.project(novel_x), novel_y)
    assert after >= untrained + 0.3, (untrained, after)


def test_learned_whitening_needs_two_products_and_matching_labels():
    from shoplens.vision.embedding import learned_whitening

    x = np.ones((4, 8), np.float32)
    with pytest.raises(ValueError, match="two products"):
        learned_whitening(x, [1, 1, 1, 1])
    with pytest.raises(ValueError, match="length"):
        learned_whitening(x, [1, 2])


def test_gem_pooled_flip_averaged_whitened_embedder_saves_and_reloads_to_the_same_vectors(tmp_path):
    from shoplens.vision.embedding import learned_whitening

    settings = Settings().with_overrides(model_init="random")
    avg = Embedder("efficientnet_lite0", 32, settings=settings)
    gem = Embedder("efficientnet_lite0", 32, settings=settings, pooling="gem", gem_p=3.0,
                   flip_tta=True)
    imgs = [_photo(p, v) for p in SHAPES for v in range(2)]
    feats = gem.features(gem.centre_crops(gem.squares(imgs)))
    assert not np.allclose(feats, avg.features(avg.centre_crops(avg.squares(imgs))))
    whitened = gem.with_whitening(learned_whitening(feats, [p for p in SHAPES for _ in range(2)],
                                                    dim=4))
    whitened.save(tmp_path / "emb")
    config = json.loads((tmp_path / "emb" / "embedding.json").read_text())
    assert config["pooling"] == "gem" and config["gem_p"] == 3.0 and config["flip_tta"]
    assert config["dim"] == 4
    loaded = Embedder.load(tmp_path / "emb", settings)
    a, b = whitened.embed_decoded(imgs), loaded.embed_decoded(imgs)
    assert a.shape == (len(imgs), 4)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling"):
        Embedder("efficientnet_lite0", 32, pooling="median")


# --- several backbones --------------------------------------------------------------------------
TWO_BACKBONES = "efficientnet_lite0+efficientnet_lite1"


def test_several_backbones_concatenate_each_ones_normalised_features_and_reload_the_same(tmp_path):
    from shoplens.vision.embedding import learned_whitening

    settings = Settings().with_overrides(model_init="random")
    both = Embedder(TWO_BACKBONES, 32, settings=settings, pooling="gem", flip_tta=True)
    assert both.backbones == ["efficientnet_lite0", "efficientnet_lite1"]
    singles = [Embedder(name, 32, settings=settings, pooling="gem", flip_tta=True)
               for name in both.backbones]
    imgs = [_photo(p, v) for p in SHAPES for v in range(2)]
    feats = both.features_decoded(imgs)
    assert feats.shape == (len(imgs), sum(s.feature_dim for s in singles)) == \
        (len(imgs), both.feature_dim)
    np.testing.assert_allclose(
        feats, np.concatenate([l2_normalise(s.features_decoded(imgs)) for s in singles], 1),
        atol=1e-5)
    whitened = both.with_whitening(learned_whitening(feats, [p for p in SHAPES for _ in range(2)],
                                                     dim=4))
    assert whitened.dim == 4 and whitened.feature_dim == feats.shape[1]
    whitened.save(tmp_path / "emb")
    config = json.loads((tmp_path / "emb" / "embedding.json").read_text())
    assert config["backbones"] == both.backbones and config["backbone"] == TWO_BACKBONES
    loaded = Embedder.load(tmp_path / "emb", settings)
    assert loaded.backbones == both.backbones and loaded.flip_tta and loaded.pooling == "gem"
    a, b = whitened.embed_decoded(imgs), loaded.embed_decoded(imgs)
    assert a.shape == (len(imgs), 4)
    np.testing.assert_allclose(a, b, atol=1e-5)


def _member_like_training(name: str, settings: Settings, scale: float):
    """A closed-set member as modeling/member_training builds it (backbone, dropout, classifier),
    its backbone weights moved away from the fresh ones as fine-tuning would."""
    import keras

    from modeling.ensemble import HEAD_INPUT_LAYER
    from shoplens.vision import backbones

    backbone = backbones.member(name).build(32, settings)
    backbone.set_weights([w * scale for w in backbone.get_weights()])
    dropout = keras.layers.Dropout(0.2, name=HEAD_INPUT_LAYER)
    return keras.Model(backbone.inputs[0], keras.layers.Dense(
        len(SHAPES), activation="softmax", name="classifier")(dropout(backbone.outputs[0])))


def test_an_embedder_over_the_ensembles_fine_tuned_backbones_computes_their_features(tmp_path):
    """The search embedding can run on the closed-set ensemble's fine-tuned members: each
    member's backbone is saved as weights a fresh backbone loads, the embedder's features are the
    members' own pooled features (each L2-normalised, concatenated), and the embedding keeps its
    backbones through save and load."""
    import keras

    from modeling.ensemble import HEAD_INPUT_LAYER, Ensemble, save
    from shoplens.vision import images
    from shoplens.vision.embedding import EmbeddingError, learned_whitening

    settings = Settings().with_overrides(model_init="random")
    names = TWO_BACKBONES.split("+")
    members = [(name, 32, _member_like_training(name, settings, 1.1 + i / 10))
               for i, name in enumerate(names)]
    labels = [{"label": i, "product_id": 10 + i, "name": s} for i, s in enumerate(SHAPES)]
    ens = Ensemble.load(save(tmp_path / "ens", {"model_id": "m-1"},
                             {"labels": labels, "num_classes": len(labels)}, members))
    weights = ens.backbone_weights(tmp_path / "weights", settings)
    assert sorted(weights) == sorted(names) and all(w["image_size"] == 32 for w in weights.values())
    tuned = Embedder(TWO_BACKBONES, 32, settings=settings, tuned_blocks=5,
                     part_weights={n: w["file"] for n, w in weights.items()})
    imgs = [_photo(p, v) for p in SHAPES for v in range(2)]
    squares = np.stack([np.asarray(images.centre_crop(images.fitted_square(
        img, images.margin_size(32)), 32)) for img in imgs]).astype(np.float32)
    own = np.concatenate([l2_normalise(np.asarray(keras.Model(
        m.inputs, m.get_layer(HEAD_INPUT_LAYER).input).predict_on_batch(squares)))
        for _, _, m in members], 1)
    np.testing.assert_allclose(tuned.features_decoded(imgs), own, atol=1e-4)
    untuned = Embedder(TWO_BACKBONES, 32, settings=settings).features_decoded(imgs)
    assert not np.allclose(untuned, own, atol=1e-3)
    whitened = tuned.with_whitening(learned_whitening(own, [p for p in SHAPES for _ in range(2)],
                                                      dim=4))
    whitened.save(tmp_path / "emb")
    loaded = Embedder.load(tmp_path / "emb", settings)
    assert loaded.part_weights is not None and loaded.tuned_blocks == 5
    np.testing.assert_allclose(loaded.embed_decoded(imgs), whitened.embed_decoded(imgs), atol=1e-5)
    (tmp_path / "emb" / "backbone.efficientnet_lite1.weights.h5").unlink()
    with pytest.raises(EmbeddingError, match="efficientnet_lite1.weights.h5 missing"):
        Embedder.load(tmp_path / "emb", settings)


def test_a_member_that_is_not_the_backbone_it_is_named_after_is_refused(tmp_path):
    from modeling.ensemble import EnsembleError, Ensemble, save

    settings = Settings().with_overrides(model_init="random")
    member = _member_like_training("efficientnet_lite0", settings, 1.0)
    ens = Ensemble.load(save(tmp_path / "ens", {"model_id": "m-1"}, {"labels": [], "num_classes": 0},
                             [("efficientnet_lite1", 32, member)]))
    with pytest.raises(EnsembleError, match="efficientnet_lite1"):
        ens.backbone_weights(tmp_path / "weights", settings)


def test_several_backbones_refuse_repeats_unknown_names_fine_tuning_and_single_crop_calls():
    from shoplens.vision.embedding import EmbeddingError

    with pytest.raises(ValueError, match="twice"):
        Embedder("efficientnet_lite0+efficientnet_lite0", 32)
    with pytest.raises(ValueError, match="unknown"):
        Embedder("efficientnet_lite0+resnet999", 32)
    with pytest.raises(ValueError, match="part_weights"):
        Embedder(TWO_BACKBONES, 32, tuned_blocks=1)
    with pytest.raises(ValueError, match="backbones are"):
        Embedder(TWO_BACKBONES, 32, tuned_blocks=1, part_weights={"efficientnet_lite0": "w.h5"})
    both = Embedder(TWO_BACKBONES, 32)
    with pytest.raises(EmbeddingError, match="features_decoded"):
        both.squares([_photo(next(iter(SHAPES)), 0)])


def test_a_saved_embedding_naming_an_unknown_backbone_is_not_loadable(tmp_path):
    from shoplens.vision.embedding import EmbeddingError

    settings = Settings().with_overrides(model_init="random")
    Embedder(TWO_BACKBONES, 32, settings=settings).save(tmp_path / "emb")
    config = json.loads((tmp_path / "emb" / "embedding.json").read_text())
    config["backbones"] = ["efficientnet_lite0", "no_such_net"]
    (tmp_path / "emb" / "embedding.json").write_text(json.dumps(config))
    with pytest.raises(EmbeddingError, match="no_such_net"):
        Embedder.load(tmp_path / "emb")


def test_the_embedding_backbone_setting_may_name_several_backbones():
    from shoplens.vision.current import baseline_embedder, embedding_backbone

    settings = Settings().with_overrides(model_init="random", embedding_backbone=TWO_BACKBONES)
    assert embedding_backbone(settings) == TWO_BACKBONES
    assert baseline_embedder(settings, 32).backbones == ["efficientnet_lite0", "efficientnet_lite1"]
    with pytest.raises(ValueError, match="unknown"):
        embedding_backbone(settings.with_overrides(embedding_backbone="efficientnet_lite0+vgg99"))

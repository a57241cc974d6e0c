"""The search embedding in the model registry: trained on a dataset version, measured against
the untrained baseline in the same run, stored under models/<id>/ with kind 'embedding', and
promoted by the ensemble's gate mechanics — with a current model of its own, so promoting or
rolling back one kind never moves the other."""
from __future__ import annotations

import json

import numpy as np
import pytest
import sqlalchemy as sa

from shoplens.manifest import engine_for
from test_model_training import make_dataset, synthetic_photo, tiny_settings


@pytest.fixture
def settings(manifest_url, s3_settings, tmp_path):
    return tiny_settings(model_members=("efficientnet_lite0",), model_init="random",
                         embedding_dim=16, embedding_epochs=2, embedding_views=1,
                         model_work_dir=str(tmp_path / "work")).with_overrides(
        manifest_url=manifest_url, s3_endpoint=s3_settings.s3_endpoint,
        s3_access_key=s3_settings.s3_access_key, s3_secret_key=s3_settings.s3_secret_key,
        s3_bucket=s3_settings.s3_bucket)


def rows(settings, sql, **params):
    with engine_for(settings.manifest_url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]


def registered(settings, model_id, kind, top1=0.5, promote=None):
    """A complete model row with a headline test score, without training anything;
    ``promote``: force the gate's answer (default: promote only the first of its kind)."""
    from modeling import registry

    member = registry.HEADLINE_MEMBER[kind]
    registry.begin(settings, model_id, "v0001", "offline", {}, kind=kind)
    scores = registry.metric_rows(model_id, "v0001", "test",
                                  {member: {"top1": top1, "top3": 0.9, "n": 10}}, False)
    registry.complete(settings, model_id, scores, {},
                      lambda conn, current: ((current is None) if promote is None else promote,
                                             "by the test"), kind=kind)


def test_embedding_runs_register_store_measure_the_baseline_and_pass_the_gate(settings, tmp_path):
    from modeling import registry, train_embedding
    from shoplens.store import ObjectStore

    registered(settings, "e-ensemble", "ensemble")
    v1 = make_dataset(tmp_path, "v0001", seed=1)
    first = train_embedding.run(settings.with_overrides(embedding_baseline_margin=-1.0), str(v1))
    model_id = first["model_id"]
    stored = rows(settings, "SELECT kind, status, promoted, reason FROM models WHERE id = :m",
                  m=model_id)[0]
    assert stored == {"kind": "embedding", "status": "complete", "promoted": True,
                      "reason": first["reason"]}
    prefix = f"models/{model_id}/"
    assert {prefix + "embedding.json", prefix + "head.npz", prefix + "metrics.json"} <= set(
        ObjectStore(settings).list_keys(prefix))

    # Trained and untrained baseline measured in the same run, on val and test (R@1 in top1).
    metrics = rows(settings, "SELECT split, member, top1, n FROM model_metrics WHERE model_id = :m "
                   "ORDER BY split, member", m=model_id)
    assert [(r["split"], r["member"], r["n"]) for r in metrics] == [
        ("test", "baseline", 9), ("test", "embedding", 9),
        ("val", "baseline", 9), ("val", "embedding", 9)]
    test = {r["member"]: r["top1"] for r in metrics if r["split"] == "test"}
    assert first["reason"] == (f"first embedding: test R@1 {test['embedding']:.4f} beats the "
                               f"untrained baseline {test['baseline']:.4f} by >= -1.0")

    # The embedding has its own current model: the ensemble's is untouched.
    assert registry.current_model_id(settings, "embedding") == model_id
    assert registry.current_model_id(settings) == "e-ensemble"

    # Other stages load it from the store; it reproduces the R@1 the run recorded.
    loaded_id, embedder = registry.load_current_embedding(settings, tmp_path / "cache")
    assert loaded_id == model_id and embedder.trained and embedder.dim == 16
    from modeling.dataset_layout import LocalDataset

    data = train_embedding.load_splits(LocalDataset(v1))
    assert train_embedding.evaluate_embedding(embedder, data)["test"]["top1"] == pytest.approx(
        test["embedding"])
    vector = embedder.embed_bytes([synthetic_photo(1, np.random.default_rng(3))])
    assert vector.shape == (1, 16) and np.linalg.norm(vector) == pytest.approx(1, abs=1e-5)

    # On a new version: a margin over the baseline no embedding can reach refuses it, in words;
    # the current embedding is re-measured on the new version (like with like) and stays.
    v2 = make_dataset(tmp_path, "v0002", seed=2)
    second = train_embedding.run(settings.with_overrides(embedding_baseline_margin=1.01), str(v2))
    assert not second["promoted"]
    assert "does not beat the untrained baseline" in second["reason"]
    assert rows(settings, "SELECT promoted, reason FROM models WHERE id = :m",
                m=second["model_id"]) == [{"promoted": False, "reason": second["reason"]}]
    re_measured = rows(settings, "SELECT top1, n FROM model_metrics WHERE model_id = :m AND "
                       "dataset_version = 'v0002' AND split = 'test' AND member = 'embedding'",
                       m=model_id)
    assert [r["n"] for r in re_measured] == [9]
    assert second["previous_r1_same_split"] == pytest.approx(re_measured[0]["top1"])

    # Beating the baseline is not enough when the current embedding is better by more than the
    # gate's margin (compared on v0002, where it was just re-measured).
    third = train_embedding.run(settings.with_overrides(
        embedding_baseline_margin=-1.0, model_promotion_margin=-1.0), str(v2))
    assert not third["promoted"] and " but < current " + model_id in third["reason"]
    assert third["previous_r1_same_split"] == pytest.approx(re_measured[0]["top1"])
    assert registry.current_model_id(settings, "embedding") == model_id
    assert registry.current_model_id(settings) == "e-ensemble"


@pytest.mark.parametrize("new, current_r1, promoted, reason", [
    (0.70, None, False, "embedding test R@1 0.7000 does not beat the untrained baseline 0.6900 "
                        "by the margin 0.02"),
    (0.72, None, True, "first embedding: test R@1 0.7200 beats the untrained baseline 0.6900 "
                       "by >= 0.02"),
    (0.72, 0.80, False, "embedding test R@1 0.7200 beats the untrained baseline 0.6900 by >= 0.02 "
                        "but < current e1 0.8000 - margin 0.05"),
    (0.76, 0.80, True, "embedding test R@1 0.7600 beats the untrained baseline 0.6900 by >= 0.02 "
                       "and >= current e1 0.8000 - margin 0.05"),
])
def test_the_gate_wants_the_baseline_beaten_and_the_current_embedding_kept_up_with(
        new, current_r1, promoted, reason):
    from modeling.train_embedding import gate

    current = "e1" if current_r1 is not None else None
    assert gate(new, 0.69, current, current, current_r1, 0.02, 0.05) == (promoted, reason)
    if current:  # someone promoted another embedding while this one trained
        assert gate(new, 0.69, current, "e9", current_r1, 0.02, 0.05) == (
            False, "current embedding changed to e9 during this run; not compared, run again")


def test_a_failed_embedding_run_is_recorded_and_promotes_nothing(settings, tmp_path):
    from modeling import registry, train_embedding
    from modeling.dataset_layout import DatasetError

    broken = make_dataset(tmp_path, "v0003", per_split=(2, 1, 0))
    with pytest.raises(DatasetError, match="test split is empty"):
        train_embedding.run(settings, str(broken))
    assert rows(settings, "SELECT kind, status, promoted FROM models") == [
        {"kind": "embedding", "status": "failed", "promoted": False}]
    assert registry.current_model_id(settings, "embedding") is None
    assert registry.load_current_embedding(settings) is None


def test_promote_and_rollback_move_only_their_own_kind(settings):
    from modeling import registry

    registered(settings, "ens-1", "ensemble")
    registered(settings, "ens-2", "ensemble")
    registered(settings, "emb-1", "embedding")
    registered(settings, "emb-2", "embedding")
    assert (registry.current_model_id(settings), registry.current_model_id(settings, "embedding")
            ) == ("ens-1", "emb-1")

    done = registry.promote(settings, "emb-2", "better on the new photos")
    assert done["kind"] == "embedding" and done["previous_model_id"] == "emb-1"
    assert registry.current_model_id(settings) == "ens-1"
    registry.promote(settings, "ens-2", "the ensemble too")
    assert registry.current_model_id(settings, "embedding") == "emb-2"

    # The latest promotion overall is the ensemble's, yet an embedding rollback goes back to
    # the previous embedding, and an ensemble rollback to the previous ensemble.
    back = registry.rollback(settings, "worse on phones", kind="embedding")
    assert (back["model_id"], back["previous_model_id"]) == ("emb-1", "emb-2")
    assert registry.current_model_id(settings) == "ens-2"
    registry.promote(settings, "emb-2", "again")
    back = registry.rollback(settings, "")
    assert (back["model_id"], back["kind"]) == ("ens-1", "ensemble")
    assert registry.current_model_id(settings, "embedding") == "emb-2"

    # A model of the other kind is not a rollback target.
    with pytest.raises(registry.PromotionRefused, match="ens-2 is an ensemble model, not an "
                                                        "embedding"):
        registry.rollback(settings, "", to="ens-2", kind="embedding")
    assert registry.current_model_id(settings, "embedding") == "emb-2"


def test_the_cli_lists_and_rolls_back_by_kind(settings, monkeypatch, capsys):
    from shoplens import cli

    for key in ("manifest_url", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket"):
        monkeypatch.setenv(f"SHOPLENS_{key.upper()}", str(getattr(settings, key)))
    registered(settings, "ens-1", "ensemble", top1=0.8)
    registered(settings, "emb-1", "embedding", top1=0.6)
    registered(settings, "emb-2", "embedding", top1=0.7, promote=True)

    assert cli.main(["models", "list", "--kind", "embedding", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(m["id"], m["kind"], m["current"], m["top1"]) for m in listed] == [
        ("emb-1", "embedding", False, pytest.approx(0.6)),
        ("emb-2", "embedding", True, pytest.approx(0.7))]
    assert cli.main(["models", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines] == [
        ["*", "ens-1", "complete", "ensemble"], ["emb-1", "complete", "embedding", "trained"],
        ["*", "emb-2", "complete", "embedding"]]
    assert "R@1 0.700 R@3 0.900" in lines[2] and "top1 0.800 top3 0.900" in lines[0]

    # `shoplens train --kind embedding` is the embedding's training run (the ensemble's without).
    import modeling.train_embedding

    called = []
    monkeypatch.setattr(modeling.train_embedding, "run", lambda settings, version: called.append(
        version) or {"model_id": "emb-3", "kind": "embedding", "promoted": False})
    assert cli.main(["train", "--kind", "embedding", "--dataset-version", "v0009", "--json"]) == 0
    assert called == ["v0009"] and json.loads(capsys.readouterr().out)["model_id"] == "emb-3"

    assert cli.main(["models", "rollback", "--kind", "embedding", "--reason", "drifted"]) == 0
    assert capsys.readouterr().out.startswith("current embedding: emb-1 (was emb-2)")
    assert cli.main(["models", "rollback"]) == 2  # the ensemble has no earlier model
    assert "ens-1 was the first current model (ensemble)" in capsys.readouterr().err


def test_retrieval_scores_rank_products_by_their_prototype():
    """Each product is enrolled as the normalised mean of its photos; a query counts at R@k when
    its product is among the k best; a product never enrolled is a miss."""
    from modeling.train_embedding import retrieval_scores

    enrolled = np.array([[1, 0, 0, 0], [0.8, 0.6, 0, 0],   # product 0: two photos
                         [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)
    labels = [0, 0, 1, 2, 3]
    queries = np.array([[0.95, 0.31, 0, 0],     # product 0 is nearest: R@1 hit
                        [0.6, 0.0, 0.7, 0.3],   # product 1's photo, ranked 4th (2, 0, 3, 1)
                        [0.0, 0.2, 0.1, 0.97],  # product 3: hit
                        [0, 0, 0.6, 0.8]],      # product 7: never enrolled, a miss
                       dtype=np.float32)
    scores = retrieval_scores(enrolled, labels, queries, [0, 1, 3, 7])
    assert scores == {"top1": 0.5, "top3": 0.5, "n": 4}
    scores = retrieval_scores(enrolled, labels, queries[1:2], [2])
    assert scores == {"top1": 1.0, "top3": 1.0, "n": 1}


def test_loading_the_current_embedding_says_which_service_is_unreachable(settings, tmp_path):
    from modeling import registry
    from shoplens.cli import ServiceUnreachable

    registered(settings, "emb-1", "embedding")
    with pytest.raises(ServiceUnreachable, match="embedding emb-1: the object store at "
                                                 "127.0.0.1:9 is unreachable"):
        registry.load_current_embedding(settings.with_overrides(s3_endpoint="127.0.0.1:9"),
                                        tmp_path / "cache")
    with pytest.raises(ServiceUnreachable, match="the manifest is unreachable"):
        registry.load_current_embedding(settings.with_overrides(
            manifest_url="postgresql+psycopg2://nobody@127.0.0.1:9/shoplens"), tmp_path / "cache")
    with pytest.raises(registry.ModelNotFound, match="no complete artefacts"):
        registry.load_current_embedding(settings, tmp_path / "cache")  # a row without files


def test_a_whitening_run_stores_a_whitened_embedding_that_the_registry_loads(settings, tmp_path):
    from modeling import train_embedding
    from shoplens.store import ObjectStore
    from shoplens.vision.current import load_current_embedding

    version = make_dataset(tmp_path, "v0001", seed=3)
    run = train_embedding.run(settings.with_overrides(
        embedding_method="whitening", embedding_dim=16, embedding_baseline_margin=-1.0),
        str(version))
    prefix = f"models/{run['model_id']}/"
    keys = set(ObjectStore(settings).list_keys(prefix))
    assert prefix + "whitening.npz" in keys and prefix + "head.npz" not in keys
    model_id, embedder = load_current_embedding(settings, tmp_path / "cache")
    assert model_id == run["model_id"]
    assert embedder.whitening is not None and embedder.dim == 16


def test_the_embedding_method_is_checked_when_settings_are_made(settings):
    from shoplens.config import ConfigError

    with pytest.raises(ConfigError, match="embedding_method"):
        settings.with_overrides(embedding_method="arcface")

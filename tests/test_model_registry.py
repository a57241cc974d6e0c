"""Training runs against the real manifest and object store: artefacts under models/<id>/,
metrics rows tied to model and dataset version, the promotion gate, re-evaluation of the current
model on a new version's test split, predict/export of stored models, failed runs recorded."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import sqlalchemy as sa

from shoplens.cli import BadInput, ServiceUnreachable
from shoplens.manifest import engine_for
from test_model_training import make_dataset, synthetic_photo, tiny_settings


@pytest.fixture
def settings(manifest_url, s3_settings, tmp_path):
    return tiny_settings(model_members=("efficientnet_lite0",), model_init="random",
                         model_finetune_epochs=0, model_views_per_image=1, model_tta="off",
                         model_work_dir=str(tmp_path / "work")).with_overrides(
        manifest_url=manifest_url, s3_endpoint=s3_settings.s3_endpoint,
        s3_access_key=s3_settings.s3_access_key, s3_secret_key=s3_settings.s3_secret_key,
        s3_bucket=s3_settings.s3_bucket)


def rows(settings, sql, **params):
    with engine_for(settings.manifest_url).connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql), params)]


def test_runs_store_artefacts_and_metrics_and_gate_promotion(settings, tmp_path):
    from modeling import registry, train
    from modeling.__main__ import main as cli
    from shoplens.store import ObjectStore

    v1 = make_dataset(tmp_path, "v0001", seed=1)
    first = train.run(settings, str(v1))
    assert first["promoted"] and first["reason"].startswith("first model")
    keys = set(ObjectStore(settings).list_keys(f"models/{first['model_id']}/"))
    prefix = f"models/{first['model_id']}/"
    assert {prefix + "ensemble.json", prefix + "labels.json", prefix + "metrics.json",
            prefix + "members/efficientnet_lite0.keras", prefix + "report/index.html"} <= keys
    assert registry.current_model_id(settings) == first["model_id"]
    metrics = rows(settings, "SELECT member, split, n FROM model_metrics WHERE model_id = :m "
                   "AND dataset_version = 'v0001' ORDER BY split, member", m=first["model_id"])
    assert metrics == [{"member": "efficientnet_lite0", "split": "test", "n": 9},
                       {"member": "ensemble", "split": "test", "n": 9},
                       {"member": "efficientnet_lite0", "split": "val", "n": 9},
                       {"member": "ensemble", "split": "val", "n": 9}]

    # A second run on a new version, with a margin no model can meet: the current model is
    # re-evaluated on v0002's test split and stays current; the reason is recorded.
    v2 = make_dataset(tmp_path, "v0002", seed=2)
    second = train.run(settings.with_overrides(model_promotion_margin=-1.0), str(v2))
    assert not second["promoted"] and " < current " in second["reason"]
    assert second["previous_model"] == first["model_id"]
    re_eval = rows(settings, "SELECT n FROM model_metrics WHERE model_id = :m AND "
                   "dataset_version = 'v0002' AND split = 'test' AND member = 'ensemble'",
                   m=first["model_id"])
    assert re_eval == [{"n": 9}]
    assert second["previous_top1_same_split"] == pytest.approx(
        rows(settings, "SELECT top1 FROM model_metrics WHERE model_id = :m AND "
             "dataset_version = 'v0002' AND member = 'ensemble'", m=first["model_id"])[0]["top1"])
    stored = rows(settings, "SELECT status, promoted, reason FROM models WHERE id = :m",
                  m=second["model_id"])[0]
    assert stored["status"] == "complete" and not stored["promoted"]
    assert stored["reason"] == second["reason"]
    assert registry.current_model_id(settings) == first["model_id"]

    # A third run that is allowed to win replaces it (same split, margin 0 against itself).
    third = train.run(settings.with_overrides(model_promotion_margin=1.0), str(v2))
    assert third["promoted"] and registry.current_model_id(settings) == third["model_id"]
    history = rows(settings, "SELECT model_id, previous_model_id FROM model_promotions ORDER BY id")
    assert history == [{"model_id": first["model_id"], "previous_model_id": None},
                       {"model_id": third["model_id"], "previous_model_id": first["model_id"]}]

    # predict with no --model uses the current model, fetched from the object store.
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(synthetic_photo(2, np.random.default_rng(5)))
    from modeling import predict

    out = io.StringIO()
    code = predict.main(settings, None, [str(photo)], True, tmp_path / "cache", out=out)
    assert code == 0 and json.loads(out.getvalue())["image"] == str(photo)

    # export writes a directory that predict --model DIR accepts.
    import os
    env = {f"SHOPLENS_{k.upper()}": str(v) for k, v in (
        ("manifest_url", settings.manifest_url), ("s3_endpoint", settings.s3_endpoint),
        ("s3_access_key", settings.s3_access_key), ("s3_secret_key", settings.s3_secret_key),
        ("s3_bucket", settings.s3_bucket), ("model_work_dir", settings.model_work_dir))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        assert cli(["export", "--model", first["model_id"], "--out", str(tmp_path / "exp")]) == 0
        assert cli(["evaluate", "--model", first["model_id"], "--dataset-version", str(v1)]) == 0
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    out = io.StringIO()
    assert predict.main(settings, str(tmp_path / "exp"), [str(photo)], True, tmp_path, out=out) == 0


def test_a_failed_run_is_recorded_and_promotes_nothing(settings, tmp_path):
    from modeling import registry, train
    from modeling.dataset_layout import DatasetError

    broken = make_dataset(tmp_path, "v0003", per_split=(2, 1, 0))
    with pytest.raises(DatasetError):
        train.run(settings, str(broken))
    (model,) = rows(settings, "SELECT status, error, promoted FROM models")
    assert model["status"] == "failed" and "test split is empty" in model["error"]
    assert registry.current_model_id(settings) is None


def tiny_ensemble_dir(root):
    """An ensemble directory whose one member is a small untrained Keras model: enough to test
    predict's file handling without training anything."""
    import keras

    from modeling.ensemble import save

    inputs = keras.Input((32, 32, 3))
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))))
    labels = [{"label": i, "product_id": 10 + i, "name": f"p{i}", "category_id": "x"} for i in range(3)]
    return save(root, {"model_id": "m-tiny", "tta": False}, {"labels": labels, "num_classes": 3},
                [("tiny", 32, model)])


def test_predict_reports_unreadable_files_and_answers_the_others(settings, tmp_path):
    from modeling import predict

    model_dir = tiny_ensemble_dir(tmp_path / "ens")
    good = tmp_path / "good.webp"
    good.write_bytes(synthetic_photo(0, np.random.default_rng(1), "WEBP"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 truncated")
    out, err = io.StringIO(), io.StringIO()
    code = predict.main(settings, str(model_dir), [str(bad), str(good), str(tmp_path / "nope.png")],
                        True, tmp_path, out=out, err=err)
    assert code == 1
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["image"] for line in lines] == [str(good)]
    assert [t["name"] for t in lines[0]["top"]] != [] and len(lines[0]["top"]) == 3
    assert str(bad) in err.getvalue() and "nope.png" in err.getvalue() and "2 of 3" in err.getvalue()


def test_predict_turns_photos_upright_by_exif_and_takes_any_size(settings, tmp_path):
    from PIL import Image

    from shoplens.vision import images

    # A tall photo stored sideways with EXIF orientation 6 (rotate 90 degrees clockwise to view).
    sideways = Image.new("RGB", (120, 40), (200, 0, 0))
    sideways.paste((0, 0, 200), (0, 0, 60, 40))  # left half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    sideways.save(buf, "JPEG", exif=exif)
    upright = images.decode(buf.getvalue(), "sideways.jpg")
    assert upright.size == (40, 120)
    top = np.asarray(upright)[:10].mean(axis=(0, 1))
    assert top[2] > 150 and top[0] < 60  # the stored left (blue) half is now on top
    assert images.model_input(buf.getvalue(), 32).shape == (32, 32, 3)


def test_predict_with_a_missing_ensemble_directory_says_so_without_asking_the_store(
        settings, tmp_path):
    from modeling import predict

    (tmp_path / "photo.jpg").write_bytes(synthetic_photo(0, np.random.default_rng(2)))
    unreachable = settings.with_overrides(s3_endpoint="127.0.0.1:9")
    missing = str(tmp_path / "no-such-ensemble")
    with pytest.raises(BadInput, match="no such ensemble directory"):
        predict.main(unreachable, missing, [str(tmp_path)], True, tmp_path, out=io.StringIO())


def test_predict_says_which_service_is_unreachable_when_a_model_id_cannot_be_fetched(
        settings, tmp_path):
    from modeling import predict

    (tmp_path / "photo.jpg").write_bytes(synthetic_photo(0, np.random.default_rng(2)))
    unreachable = settings.with_overrides(s3_endpoint="127.0.0.1:9")
    with pytest.raises(ServiceUnreachable, match="object store at 127.0.0.1:9 is unreachable"):
        predict.main(unreachable, "m20260101T000000-abcdef", [str(tmp_path)], True, tmp_path,
                     out=io.StringIO())
    no_manifest = settings.with_overrides(
        manifest_url="postgresql+psycopg2://nobody@127.0.0.1:9/shoplens")
    with pytest.raises(ServiceUnreachable, match="manifest is unreachable"):
        predict.main(no_manifest, None, [str(tmp_path)], True, tmp_path, out=io.StringIO())


def test_the_cli_says_there_is_no_current_model_instead_of_a_traceback(
        settings, tmp_path, monkeypatch, capsys):
    from modeling.__main__ import main as cli

    for key in ("manifest_url", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket"):
        monkeypatch.setenv(f"SHOPLENS_{key.upper()}", str(getattr(settings, key)))
    monkeypatch.setenv("SHOPLENS_MODEL_WORK_DIR", str(tmp_path / "work"))
    (tmp_path / "photo.jpg").write_bytes(synthetic_photo(0, np.random.default_rng(2)))

    assert cli(["export", "--out", str(tmp_path / "exp")]) == 2
    assert cli(["predict", "--json", str(tmp_path / "photo.jpg")]) == 2
    assert capsys.readouterr().err.count("error: no current model") == 2
    assert not (tmp_path / "exp").exists()


def test_predict_without_any_model_says_so(settings, tmp_path):
    from modeling import predict, registry

    (tmp_path / "photo.jpg").write_bytes(synthetic_photo(0, np.random.default_rng(2)))
    with pytest.raises(registry.ModelNotFound, match="no current model"):
        predict.main(settings, None, [str(tmp_path)], True, tmp_path, out=io.StringIO())

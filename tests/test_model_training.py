"""Training, saving, reloading, evaluating and predicting, end to end on a tiny generated dataset.

The seed profile's three fixed architectures (VGG19, MobileNetV3Large, ResNet50) cannot be made
small, so the dataset is tiny and the photos 32 px; weights start random (no download here).
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from modeling.dataset_layout import DatasetError, LocalDataset, write_local_dataset
from shoplens.config import Settings

COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40)]


def synthetic_photo(label: int, rng: np.random.Generator, fmt: str = "JPEG") -> bytes:
    """A 'product' of a class-specific colour and shape on a noisy background, random placement."""
    w, h = int(rng.integers(40, 90)), int(rng.integers(40, 90))
    bg = rng.integers(0, 90, size=(h, w, 3), dtype=np.uint8)
    img = Image.fromarray(bg)
    draw = ImageDraw.Draw(img)
    x, y = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    box = (x, y, x + w // 2 + 5, y + h // 2 + 5)
    colour = COLOURS[label % len(COLOURS)]
    (draw.ellipse if label % 2 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_dataset(root, version="v0001", classes=3, per_split=(6, 3, 3), seed=0):
    rng = np.random.default_rng(seed)
    labels = [{"label": i, "product_id": 5000 + i, "name": f"product-{i}", "category_id": "16220000"}
              for i in range(classes)]
    photos = []
    for split, n in zip(("train", "val", "test"), per_split):
        for label in range(classes):
            photos += [(synthetic_photo(label, rng), label, split) for _ in range(n)]
    return write_local_dataset(root / version, version, labels, photos)


def tiny_settings(**overrides) -> Settings:
    base = dict(model_image_size=32, model_views_per_image=2, model_head_epochs=1,
                model_finetune_epochs=1, model_batch_size=16, model_work_dir="")
    base.update(overrides)
    return Settings().with_overrides(**base)


def test_dataset_layout_round_trips(tmp_path):
    ds = LocalDataset(make_dataset(tmp_path, classes=2, per_split=(2, 1, 1)))
    assert ds.num_classes == 2 and ds.version_id == "v0001"
    train = ds.load_split("train")
    assert len(train) == 4 and sorted(train.labels.tolist()) == [0, 0, 1, 1]
    assert all(len(sha) == 64 for sha in train.sha256)


def test_a_folder_without_version_json_is_not_a_dataset(tmp_path):
    """version.json is written last: without it, the export or download did not finish."""
    (tmp_path / "labels.json").write_text('{"labels": [], "num_classes": 0}')
    with pytest.raises(DatasetError, match="version.json .* is missing"):
        LocalDataset(tmp_path)


def test_seed_profile_trains_all_three_architectures_saves_reloads_evaluates_and_predicts(tmp_path):
    from modeling import predict
    from modeling.train import evaluate_model_on, train_ensemble

    data = make_dataset(tmp_path)
    settings = tiny_settings(model_profile="seed", model_init="random", model_tta="on")
    out = tmp_path / "ensemble"
    trained = train_ensemble(settings, LocalDataset(data), out, "m-test")

    test = trained["metrics"]["test"]
    assert set(test) == {"vgg19", "mobilenetv3large", "resnet50", "ensemble"}
    assert all(s["n"] == 9 and 0 <= s["top1"] <= s["top3"] <= 1 for s in test.values())
    assert trained["metrics"]["tta"] is True
    assert (out / "report" / "index.html").read_text().count("<tr>") >= 4 + 3
    assert (out / "report" / "confusion.png").stat().st_size > 0

    saved = json.loads((out / "ensemble.json").read_text())["members"]
    assert [m["name"] for m in saved] == ["vgg19", "mobilenetv3large", "resnet50"]
    # Reloaded from disk, the members score what training measured.
    scores, tta = evaluate_model_on(settings, str(out), LocalDataset(data), tmp_path)
    assert tta is True
    for name in test:
        assert scores[name]["top1"] == pytest.approx(test[name]["top1"], abs=1 / 9 + 1e-9)

    photo = tmp_path / "shot.png"
    photo.write_bytes(synthetic_photo(1, np.random.default_rng(7), "PNG"))
    out_lines = io.StringIO()
    assert predict.main(settings, str(out), [str(photo)], True, tmp_path, out=out_lines) == 0
    answer = json.loads(out_lines.getvalue())
    assert answer["image"] == str(photo) and len(answer["top"]) == 3
    assert {t["name"] for t in answer["top"]} == {"product-0", "product-1", "product-2"}
    assert sum(t["prob"] for t in answer["top"]) == pytest.approx(1.0, abs=1e-3)


def test_offline_profile_learns_the_generated_classes(tmp_path):
    """With ImageNet features a quick head fit separates colour/shape classes well above chance."""
    from modeling.train import train_ensemble

    data = make_dataset(tmp_path, classes=4, per_split=(8, 4, 6), seed=1)
    settings = tiny_settings(model_members=("efficientnet_lite0",), model_image_size=64,
                             model_head_epochs=25, model_finetune_epochs=2, model_tta="auto",
                             model_learning_rate=3e-3)
    trained = train_ensemble(settings, LocalDataset(data), tmp_path / "ens", "m-lite")
    metrics = trained["metrics"]
    assert metrics["test"]["ensemble"]["top1"] >= 0.75  # chance is 0.25
    decisions = metrics["decisions"]
    assert set(decisions["tta"]) >= {"val_top1_plain", "val_top1_flip_tta", "rule"}
    stage2 = metrics["members"]["efficientnet_lite0"]["stage2"]
    assert stage2["epochs_run"] >= 1 and stage2["kept"] == (
        stage2["val_top1"] >= metrics["members"]["efficientnet_lite0"]["stage1"]["val_top1"])


def test_an_empty_test_split_is_refused(tmp_path):
    from modeling.train import train_ensemble

    data = make_dataset(tmp_path, per_split=(2, 1, 0))
    with pytest.raises(DatasetError, match="test split is empty"):
        train_ensemble(tiny_settings(model_members=("efficientnet_lite0",), model_init="random"),
                       LocalDataset(data), tmp_path / "ens", "m-x")
    assert not (tmp_path / "ens").exists()


def test_resized_crop_views_zoom_mirror_and_jitter_within_the_photo():
    """Each view is a size x size float crop of the square; views differ from the centre crop and
    from each other, and a uniform photo stays uniform (no fill from outside the photo)."""
    from modeling.member_training import resized_crop_views

    rng = np.random.default_rng(0)
    square = np.zeros((2, 40, 40, 3), dtype=np.uint8)
    square[:, :, :20] = 200  # left half bright: mirrored or shifted crops change the mean column
    views = resized_crop_views(square, 16, rng, min_scale=0.25)
    assert views.shape == (2, 16, 16, 3) and views.dtype == np.float32
    assert 0 <= views.min() and views.max() <= 255
    more = resized_crop_views(square, 16, rng, min_scale=0.25)
    assert not np.allclose(views, more)
    grey = np.full((3, 40, 40, 3), 120, dtype=np.uint8)
    flat = resized_crop_views(grey, 16, rng, min_scale=0.25)
    assert np.ptp(flat.reshape(3, -1), axis=1).max() <= 1  # jitter scales it, but evenly


def test_stage2_rate_is_fixed_on_plateaus_cosine_decayed_and_unknown_choices_are_refused(tmp_path):
    from modeling.member_training import _callbacks, _finetune_rate

    plateau = tiny_settings(model_finetune_schedule="plateau", model_finetune_learning_rate=1e-3)
    assert _finetune_rate(plateau, 100) == 1e-3
    assert [type(c).__name__ for c in _callbacks(plateau)] == ["EarlyStopping",
                                                               "ReduceLROnPlateau"]
    assert [type(c).__name__ for c in _callbacks(plateau, plateau=False)] == ["EarlyStopping"]

    rate = _finetune_rate(tiny_settings(model_finetune_schedule="cosine",
                                        model_finetune_learning_rate=1e-3,
                                        model_finetune_epochs=2, model_batch_size=10), 100)
    assert float(rate(0)) == pytest.approx(1e-3) and float(rate(20)) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="model_finetune_schedule"):
        _finetune_rate(tiny_settings(model_finetune_schedule="linear"), 100)


def test_training_logs_one_line_per_epoch_per_member_and_the_report_plots_the_curves(tmp_path, caplog):
    """Each member's head and fine-tune epochs are logged one line each (epoch/total, loss,
    accuracy, val_loss, val_accuracy, seconds); the curves are saved with the model and the
    report shows them."""
    import logging
    import re

    from modeling.train import LEARNING_CURVES_FILE, train_ensemble

    caplog.set_level(logging.INFO, logger="modeling.training")
    data = make_dataset(tmp_path, classes=2, per_split=(3, 2, 2), seed=3)
    members = ("efficientnet_lite0", "efficientnet_lite1")
    settings = tiny_settings(model_members=members, model_init="random", model_tta="off",
                             model_head_epochs=3, model_finetune_epochs=2,
                             model_early_stopping_patience=10)
    out = tmp_path / "ens"
    train_ensemble(settings, LocalDataset(data), out, "m-curves")

    line = re.compile(r"member (\S+) (head|fine-tune) epoch (\d+)/(\d+): loss \d+\.\d{4}, "
                      r"accuracy \d\.\d{4}, val_loss \d+\.\d{4}, val_accuracy \d\.\d{4}, \d+\.\d s$")
    logged = [line.match(r.getMessage()).groups() for r in caplog.records
              if r.name == "modeling.training"]
    expected = [(m, stage, str(e), str(n)) for m in members
                for stage, n in (("head", 3), ("fine-tune", 2)) for e in range(1, n + 1)]
    assert logged == expected

    curves = json.loads((out / LEARNING_CURVES_FILE).read_text())
    assert set(curves) == set(members)
    for member in members:
        assert {s: len(c["val_accuracy"]) for s, c in curves[member].items()} == {
            "head": 3, "fine-tune": 2}
        assert all(len(c["seconds"]) == len(c["loss"]) for c in curves[member].values())
    page = (out / "report" / "index.html").read_text()
    assert 'id="learning-curves"' in page and 'src="learning_curves.png"' in page
    plot = Image.open(out / "report" / "learning_curves.png")
    assert plot.size[1] > plot.size[0] / 2  # one row of plots per member


def test_a_curve_that_cannot_be_plotted_leaves_a_note_and_the_rest_of_the_report(tmp_path, caplog):
    """Report rendering never fails training: a broken curve is logged and the page says so."""
    from modeling import evaluate

    entries = [{"label": 0, "product_id": 1, "name": "a"}, {"label": 1, "product_id": 2, "name": "b"}]
    probs = np.array([[0.9, 0.1], [0.2, 0.8]])
    metrics = {"test": {"ensemble": {"top1": 1.0, "top3": 1.0, "n": 2}}}
    broken = {"m": ["not", "stages"]}  # e.g. a curve file from an older layout
    evaluate.write_report(tmp_path, "t", metrics, probs, np.array([0, 1]), entries, [], ["a", "b"],
                          curves=broken)
    page = (tmp_path / "index.html").read_text()
    curves = page.split('id="learning-curves"')[1].split("<h2>")[0]
    assert "plot not rendered" in curves and "Confusion matrix" in page
    assert "report plot _plot_curves failed" in caplog.text

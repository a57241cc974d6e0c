"""Training run: every member of the configured profile, evaluation, artefacts, promotion.

``run(settings, dataset_version)`` is the Airflow task's entry; ``train_ensemble`` is the part
that needs neither the manifest nor the object store (benchmarks use it on a local folder).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
import traceback
import uuid
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from modeling import evaluate
from shoplens.vision import backbones
from modeling.dataset_layout import SPLITS, DatasetError, LocalDataset, open_dataset
from modeling.ensemble import save as save_ensemble
from modeling.member_training import train_member
from shoplens.config import Settings
from shoplens.datasets import load_version

log = logging.getLogger(__name__)
LEARNING_CURVES_FILE = "learning_curves.json"  # {member: {stage: {metric: [per epoch]}}}

TRAINING_SETTINGS = (
    "model_profile", "model_members", "model_image_size", "model_batch_size", "model_views_per_image",
    "model_augmentation", "model_crop_min_scale",
    "model_head_epochs", "model_finetune_epochs", "model_finetune_blocks", "model_learning_rate",
    "model_finetune_learning_rate", "model_finetune_schedule", "model_dropout",
    "model_label_smoothing",
    "model_early_stopping_patience", "model_seed", "model_tta", "model_init",
)


def new_model_id() -> str:
    return f"m{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"


def work_dir(settings: Settings) -> Path:
    if settings.model_work_dir:
        path = Path(settings.model_work_dir)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return Path(tempfile.mkdtemp(prefix="shoplens-modeling-"))


def _decide_tta(settings: Settings, results, val_labels: np.ndarray) -> tuple[bool, dict]:
    plain = np.mean([r.val_probs for r in results], axis=0)
    measured = {"val_top1_plain": evaluate.top_k_accuracy(plain, val_labels, 1)}
    if settings.model_tta in ("on", "off"):
        return settings.model_tta == "on", {**measured, "rule": f"configured {settings.model_tta}"}
    if settings.model_tta != "auto":
        raise ValueError(f"model_tta must be auto, on or off, got {settings.model_tta!r}")
    flipped = np.mean([(r.val_probs + r.val_probs_flipped) / 2 for r in results], axis=0)
    measured["val_top1_flip_tta"] = evaluate.top_k_accuracy(flipped, val_labels, 1)
    use = measured["val_top1_flip_tta"] > measured["val_top1_plain"]
    return use, {**measured, "rule": "auto: on only if it raises val Top-1"}


def train_ensemble(settings: Settings, dataset: LocalDataset, out_dir: Path,
                   model_id: str) -> dict:
    """Train, evaluate on the test split and write a complete ensemble directory to ``out_dir``."""
    t0 = time.monotonic()
    data = {s: dataset.load_split(s) for s in SPLITS}
    for s in SPLITS:
        if len(data[s]) == 0:
            raise DatasetError(f"dataset {dataset.version_id}: the {s} split is empty")
    specs = backbones.members(settings)
    use_flips = settings.model_tta != "off"
    results = []
    for spec in specs:
        log.info("training member %s", spec.name)
        results.append(train_member(spec, data, dataset.num_classes, settings, use_flips))
    tta, tta_report = _decide_tta(settings, results, data["val"].labels)

    def probs(r, split):
        p, f = (r.val_probs, r.val_probs_flipped) if split == "val" else (r.test_probs, r.test_probs_flipped)
        return (p + f) / 2 if tta else p

    test_probs = {r.name: probs(r, "test") for r in results}
    metrics = {
        "model_id": model_id, "dataset_version": dataset.version_id, "tta": tta,
        "test": evaluate.scores(test_probs, data["test"].labels),
        "val": evaluate.scores({r.name: probs(r, "val") for r in results}, data["val"].labels),
        "members": {r.name: r.report for r in results},
        "decisions": {"tta": tta_report, "stage2_kept": {
            r.name: r.report["stage2"]["kept"] for r in results}},
    }
    config = {
        "model_id": model_id, "dataset_version": dataset.version_id,
        "profile": settings.model_profile, "tta": tta,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "num_classes": dataset.num_classes,
        "training": {k: getattr(settings, k) for k in TRAINING_SETTINGS},
    }
    labels = {"labels": dataset.labels, "num_classes": dataset.num_classes}
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_ensemble(tmp, config, labels, [(r.name, r.size, r.model) for r in results])
    _check_saved_members(tmp, results, data["test"])
    ens_test = np.mean(list(test_probs.values()), axis=0)
    curves = {r.name: r.curves for r in results}
    (tmp / LEARNING_CURVES_FILE).write_text(json.dumps(curves, indent=1))
    report = evaluate.write_report(
        tmp / "report", f"Model {model_id} on {dataset.version_id}", metrics, ens_test,
        data["test"].labels, dataset.labels, data["test"].encoded, data["test"].sha256,
        curves=curves)
    metrics["worst_mistakes"] = report["worst_mistakes"]
    metrics["seconds"] = round(time.monotonic() - t0, 1)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1, ensure_ascii=False))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return {"config": config, "metrics": metrics,
            "test_top3": np.argsort(-ens_test, axis=1)[:, :3]}


def _check_saved_members(root: Path, results, test) -> None:
    """Reload each saved member and check it reproduces the training-time test probabilities
    (on a few photos), so a serialisation bug can never ship silently."""
    from modeling.ensemble import Ensemble

    ens = Ensemble.load(root)
    k = min(4, len(test))
    reloaded = ens.member_probs(test.encoded[:k], test.sha256[:k], tta=False)
    for r in results:
        diff = float(np.abs(reloaded[r.name] - r.test_probs[:k]).max())
        if diff > 0.02:  # float16 feature cache vs full float32 forward: tiny differences only
            raise RuntimeError(f"saved member {r.name} disagrees with its training-time "
                               f"predictions (max prob difference {diff:.4f})")


def begin_run(settings: Settings, dataset_version: str, setting_names, kind: str = "ensemble"):
    """A new training run's (model_id, work dir, dataset, version id), its registry row begun
    ('training') with the settings it trains under: shared by the ensemble and the embedding."""
    from modeling import registry

    model_id = new_model_id()
    base = work_dir(settings)
    dataset = open_dataset(settings, dataset_version, base)
    version = dataset.version_id if Path(dataset_version).is_dir() else dataset_version
    dataset.version.setdefault("version_id", version)
    registry.begin(settings, model_id, version, settings.model_profile,
                   {"training": {k: getattr(settings, k) for k in setting_names}}, kind=kind)
    return model_id, base, dataset, version


def run(settings: Settings, dataset_version: str) -> dict:
    """Train, evaluate, store artefacts and metrics, and decide promotion. Returns stats."""
    from modeling import registry

    model_id, base, dataset, version = begin_run(settings, dataset_version, TRAINING_SETTINGS)
    try:
        local = base / "models" / model_id
        trained = train_ensemble(settings, dataset, local, model_id)
        metrics, config = trained["metrics"], trained["config"]
        rows = registry.metric_rows(model_id, version, "test", metrics["test"], metrics["tta"])
        rows += registry.metric_rows(model_id, version, "val", metrics["val"], metrics["tta"])
        new_top1 = metrics["test"]["ensemble"]["top1"]
        current = registry.current_model_id(settings)
        current_rows = []
        current_top1 = None
        if current:
            current_top1 = registry.ensemble_score(settings, current, version)
            if current_top1 is None:  # measured on another version: re-evaluate like with like
                scores, tta = evaluate_model_on(settings, current, dataset, base)
                current_rows = registry.metric_rows(current, version, "test", scores, tta)
                current_top1 = scores["ensemble"]["top1"]
        prefix = registry.upload(settings, model_id, local)
        margin = settings.model_promotion_margin

        def decide(conn, current_now):
            if current_now is None:
                return True, f"first model: ensemble test Top-1 {new_top1:.4f}"
            if current_now != current:
                return False, (f"current model changed to {current_now} during this run; "
                               "not compared, run again")
            if new_top1 >= current_top1 - margin:
                return True, (f"ensemble test Top-1 {new_top1:.4f} >= current {current} "
                              f"{current_top1:.4f} - margin {margin}")
            return False, (f"ensemble test Top-1 {new_top1:.4f} < current {current} "
                           f"{current_top1:.4f} - margin {margin}")

        promoted, reason = registry.complete(settings, model_id, rows + current_rows,
                                             config, decide)
    except BaseException as exc:
        registry.fail(settings, model_id, "".join(traceback.format_exception_only(exc)).strip())
        raise
    return {"model_id": model_id, "dataset_version": version, "profile": settings.model_profile,
            "artifact_prefix": prefix, "promoted": promoted, "reason": reason,
            "tta": metrics["tta"], "test": metrics["test"], "seconds": metrics["seconds"],
            "previous_model": current, "previous_top1_same_split": current_top1}


def evaluate_model_on(settings: Settings, model_ref: str, dataset: LocalDataset,
                      base: Path) -> tuple[dict, bool]:
    """Scores of an existing ensemble (id or directory) on a dataset's test split."""
    from modeling.ensemble import Ensemble, is_ensemble_dir

    root = Path(model_ref) if is_ensemble_dir(model_ref) else None
    if root is None:
        from modeling import registry

        root = registry.download(settings, model_ref, base / "models-cache")
    ens = Ensemble.load(root)
    # Labels are stable per product, but a newer version may have products the model never saw:
    # its probabilities are placed by product id into the dataset's label space (unknown products
    # get 0, so their photos count as misses, which is the like-with-like comparison).
    by_product = {e["product_id"]: e["label"] for e in dataset.labels}
    columns = [by_product.get(e["product_id"]) for e in ens.labels]
    if all(c is None for c in columns):
        raise DatasetError(f"model {model_ref} shares no product with dataset {dataset.version_id}")
    # The test split is streamed a batch at a time: only the labels are kept, never the photos.
    labels: list[int] = []
    probs: dict[str, list] = {}
    for batch in load_version(dataset, "test", batch_size=64).as_numpy_iterator():
        labels += batch["label"].tolist()
        chunk = ens.member_probs(list(batch["image"]), [s.decode() for s in batch["sha256"]])
        for name, p in chunk.items():
            placed = np.zeros((len(p), dataset.num_classes), dtype=np.float32)
            for src, dst in enumerate(columns):
                if dst is not None:
                    placed[:, dst] = p[:, src]
            probs.setdefault(name, []).append(placed)
    bad = sorted({lab for lab in labels if not 0 <= lab < dataset.num_classes})
    if bad:
        raise DatasetError(f"test split has labels outside 0..{dataset.num_classes - 1}: {bad[:5]}")
    scores = evaluate.scores({k: np.concatenate(v) for k, v in probs.items()},
                             np.asarray(labels, dtype=np.int32))
    return scores, ens.tta

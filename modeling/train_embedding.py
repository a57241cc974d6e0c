"""Training run of the search embedding (models of kind ``embedding``): train, evaluate against
the untrained baseline, store, and maybe promote — the registry and gate the ensemble uses.

``run(settings, dataset_version)`` is the Airflow task's and ``shoplens train --kind embedding``'s
entry; ``train_on_dataset`` is the part that needs neither the manifest nor the object store.

- **Training** (``embedding_method``): the CosFace projection head (:mod:`modeling.embedding`)
  on the frozen backbone (``embedding_backbone``, default the profile's first member), from the
  version's ``train`` photos: each photo's centre crop plus ``embedding_views`` augmented views;
  or a learned whitening fitted in closed form on the centre crops' features. Photos are decoded
  a chunk at a time, so only their backbone features are held in memory.
- **Evaluation** (retrieval, as search answers): every product is enrolled from its ``train``
  photos (its prototype: the normalised mean of their embeddings), each ``val`` / ``test`` photo
  is a query, and R@k is the share of queries whose product is among the k best-scoring
  products (a product with no train photo cannot be found: its queries count as misses). The
  trained embedding and the untrained ImageNet baseline (the same backbone features,
  L2-normalised) are measured on the same features in the same run.
- **Metrics**: ``model_metrics`` rows of the new model, members ``embedding`` (trained) and
  ``baseline`` (untrained), ``top1`` = R@1, ``top3`` = R@3, ``n`` = queries, for ``val`` and
  ``test``; the current embedding re-evaluated on this version gets an ``embedding`` row too.
- **Gate** (on test R@1): promoted if it beats the baseline by ``embedding_baseline_margin``
  and is not worse than the current embedding (measured on this version) by more than
  ``model_promotion_margin``; the reason is stored in words.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from modeling.dataset_layout import DatasetError, LocalDataset, Split
from shoplens.config import Settings
from shoplens.progress import progress
from shoplens.vision import images
from shoplens.vision.current import baseline_embedder
from shoplens.vision.embedding import Embedder, l2_normalise, learned_whitening

log = logging.getLogger(__name__)

EMBEDDING_SETTINGS = (
    "model_profile", "embedding_backbone", "model_image_size", "embedding_dim", "embedding_epochs",
    "embedding_views", "embedding_margin", "embedding_scale", "embedding_method",
    "embedding_whiten_regularisation", "model_crop_min_scale",
    "model_seed", "model_init", "embedding_baseline_margin", "model_promotion_margin",
)
EVAL_SPLITS = ("val", "test")
_CHUNK = 64  # photos decoded at a time


def head_config(settings: Settings):
    from modeling.embedding import HeadTraining

    return HeadTraining(dim=settings.embedding_dim, epochs=settings.embedding_epochs,
                        scale=settings.embedding_scale, margin=settings.embedding_margin,
                        seed=settings.model_seed)


def split_features(embedder: Embedder, split: Split, what: str, views: int = 0,
                   seed: int = 0, min_scale: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """Backbone features of a split's photos (centre crops) and, with ``views``, of as many
    augmented re-framings of each, decoded a chunk at a time: ``(clean (N, F), augmented
    (views * N, F))``, the augmented rows in photo order within each chunk, view after view
    (their labels: :func:`augmented_labels`)."""
    from modeling.embedding import augmented_features

    clean, extra = [], []
    with progress(total=len(split), desc=f"embedding features ({what})", unit="photos") as bar:
        for start in range(0, len(split), _CHUNK):
            decoded = [images.decode(data, f"{what} photo {sha[:12]}") for data, sha in
                       zip(split.encoded[start:start + _CHUNK], split.sha256[start:start + _CHUNK])]
            # Several backbones: each on its own crops, combined (concatenated) per photo.
            part_clean, part_extra = [], []
            for part in embedder.parts:
                squares = part.squares(decoded)
                part_clean.append(part.features(part.centre_crops(squares)))
                if views:
                    part_extra.append(augmented_features(part, squares, views, seed + start,
                                                         min_scale))
            clean.append(embedder.combine(part_clean))
            if views:
                extra.append(embedder.combine(part_extra))
            bar.advance(len(decoded))
    dim = clean[0].shape[1] if clean else 0
    return (np.concatenate(clean) if clean else np.zeros((0, dim), np.float32),
            np.concatenate(extra) if extra else np.zeros((0, dim), np.float32))


def augmented_labels(labels: np.ndarray, views: int) -> np.ndarray:
    """Labels of :func:`split_features`' augmented rows (chunk by chunk, view after view)."""
    return np.concatenate([np.tile(labels[s:s + _CHUNK], views)
                           for s in range(0, len(labels), _CHUNK)] or [labels[:0]])


def retrieval_scores(enrolled: np.ndarray, enrolled_labels, queries: np.ndarray,
                     query_labels) -> dict:
    """R@1 and R@3 of unit-length query vectors against products enrolled by prototype (the
    normalised mean of their photos' vectors): ``{"top1", "top3", "n"}`` (the columns of
    ``model_metrics``)."""
    enrolled_labels = np.asarray(enrolled_labels)
    query_labels = np.asarray(query_labels)
    products = np.unique(enrolled_labels)
    prototypes = l2_normalise(np.stack([enrolled[enrolled_labels == p].mean(0) for p in products]))
    ranked = products[np.argsort(-(queries @ prototypes.T), axis=1, kind="stable")]
    n = len(query_labels)
    hit = ranked == query_labels[:, None]
    return {"top1": float(hit[:, :1].any(1).mean()) if n else 0.0,
            "top3": float(hit[:, :3].any(1).mean()) if n else 0.0, "n": int(n)}


def _feature_key(embedder: Embedder) -> tuple | None:
    """Embedders with equal keys compute the same backbone features (frozen, same weights)."""
    if embedder.tuned_blocks:
        return None
    settings = embedder.settings or Settings()
    seed = settings.model_seed if settings.model_init == "random" else None
    return (embedder.backbone, embedder.image_size, settings.model_init, seed)


def evaluate_embedding(embedder: Embedder, data: dict[str, Split], splits=("test",),
                       cached: dict | None = None) -> dict:
    """``{split: {"top1", "top3", "n"}}`` of an embedder (a registered one, say) on a dataset's
    splits, enrolled from its train split. ``cached`` (``train_on_dataset``'s ``features``) is
    reused when the embedder's backbone computes the same features."""
    needed = ("train", *splits)
    if (cached is not None and cached.get("key") == _feature_key(embedder)
            and all(s in cached for s in needed)):
        feats = cached
    else:
        feats = {s: split_features(embedder, data[s], s)[0] for s in needed}
    enrolled = embedder.project(feats["train"])
    return {s: retrieval_scores(enrolled, data["train"].labels, embedder.project(feats[s]),
                                data[s].labels) for s in splits}


def load_splits(dataset: LocalDataset) -> dict[str, Split]:
    data = {s: dataset.load_split(s) for s in ("train", *EVAL_SPLITS)}
    if len(data["train"]) == 0 or len(data["test"]) == 0:
        empty = "train" if len(data["train"]) == 0 else "test"
        raise DatasetError(f"dataset {dataset.version_id}: the {empty} split is empty")
    if len(np.unique(data["train"].labels)) < 2:
        raise DatasetError(f"dataset {dataset.version_id}: metric learning needs train photos of "
                           "at least 2 products")
    return data


def train_on_dataset(settings: Settings, dataset: LocalDataset, out_dir: Path,
                     model_id: str) -> dict:
    """Train the embedding, measure it and the untrained baseline, and write a complete
    embedding directory (``Embedder.save`` plus ``metrics.json``) to ``out_dir``."""
    from modeling.embedding import train_head

    t0 = time.monotonic()
    data = load_splits(dataset)
    eval_splits = [s for s in EVAL_SPLITS if len(data[s])]
    base = baseline_embedder(settings, settings.model_image_size)
    cfg = head_config(settings)
    views = settings.embedding_views
    train_labels = data["train"].labels
    clean, extra = split_features(base, data["train"], "train", views, cfg.seed,
                                  settings.model_crop_min_scale)
    features = {"key": _feature_key(base), "train": clean}
    for s in eval_splits:
        features[s] = split_features(base, data[s], s)[0]
    t_features = time.monotonic() - t0
    if settings.embedding_method == "whitening":
        # Closed form on the clean views: the augmented ones would teach it the augmentation's
        # variation rather than the photos'.
        del extra
        whitening = learned_whitening(clean, train_labels, settings.embedding_dim,
                                      settings.embedding_whiten_regularisation)
        report = {"method": "whitening", "dim": int(whitening["projection"].shape[1]),
                  "regularisation": settings.embedding_whiten_regularisation,
                  "photos": int(len(train_labels)), "feature_seconds": round(t_features, 1)}
        trained = base.with_whitening(whitening, report)
    else:
        head, report = train_head(np.concatenate([clean, extra]),
                                  np.concatenate([train_labels,
                                                  augmented_labels(train_labels, views)]), cfg)
        del extra
        report.update(method="head", photos=int(len(train_labels)), augmented_views=int(views),
                      feature_seconds=round(t_features, 1))
        trained = base.with_head(head, report)
    scores = {"trained": evaluate_embedding(trained, data, eval_splits, features),
              "baseline": evaluate_embedding(base, data, eval_splits, features)}
    metrics = {
        "model_id": model_id, "dataset_version": dataset.version_id, "kind": "embedding",
        "protocol": "products enrolled by prototype from train photos; val/test photos query; "
                    "top1/top3 = R@1/R@3",
        **{s: {"embedding": scores["trained"][s], "baseline": scores["baseline"][s]}
           for s in eval_splits},
        "head": report,
    }
    config = {
        "model_id": model_id, "kind": "embedding", "dataset_version": dataset.version_id,
        "backbone": base.backbone, "image_size": base.image_size, "dim": trained.dim,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "products": int(len(np.unique(train_labels))),
        "training": {k: getattr(settings, k) for k in EMBEDDING_SETTINGS},
    }
    metrics["seconds"] = round(time.monotonic() - t0, 1)
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
    (tmp / "labels.json").write_text(json.dumps(
        {"labels": dataset.labels, "num_classes": dataset.num_classes}, ensure_ascii=False))
    trained.save(tmp)  # embedding.json written last
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    log.info("embedding %s on %s: %s", model_id, dataset.version_id,
             {s: metrics[s] for s in eval_splits})
    return {"config": config, "metrics": metrics, "embedder": trained, "data": data,
            "features": features}


def gate(new_r1: float, baseline_r1: float, current: str | None, current_now: str | None,
         current_r1: float | None, baseline_margin: float, margin: float) -> tuple[bool, str]:
    """The promotion decision on test R@1, with its reason in words."""
    if new_r1 < baseline_r1 + baseline_margin:
        return False, (f"embedding test R@1 {new_r1:.4f} does not beat the untrained baseline "
                       f"{baseline_r1:.4f} by the margin {baseline_margin}")
    beats = (f"beats the untrained baseline {baseline_r1:.4f} by >= {baseline_margin}")
    if current_now is None:
        return True, f"first embedding: test R@1 {new_r1:.4f} {beats}"
    if current_now != current:
        return False, (f"current embedding changed to {current_now} during this run; "
                       "not compared, run again")
    if new_r1 >= current_r1 - margin:
        return True, (f"embedding test R@1 {new_r1:.4f} {beats} and >= current {current} "
                      f"{current_r1:.4f} - margin {margin}")
    return False, (f"embedding test R@1 {new_r1:.4f} {beats} but < current {current} "
                   f"{current_r1:.4f} - margin {margin}")


def run(settings: Settings, dataset_version: str) -> dict:
    """Train, evaluate, store the artefact and metrics, and decide promotion. Returns stats."""
    from modeling import registry
    from modeling.train import begin_run

    model_id, base, dataset, version = begin_run(settings, dataset_version, EMBEDDING_SETTINGS,
                                                 kind="embedding")
    try:
        local = base / "models" / model_id
        trained = train_on_dataset(settings, dataset, local, model_id)
        metrics, config = trained["metrics"], trained["config"]
        rows = []
        for split in EVAL_SPLITS:
            if split in metrics:
                rows += registry.metric_rows(model_id, version, split, metrics[split], False)
        new_r1 = metrics["test"]["embedding"]["top1"]
        baseline_r1 = metrics["test"]["baseline"]["top1"]
        current = registry.current_model_id(settings, "embedding")
        current_rows = []
        current_r1 = None
        if current:
            current_r1 = registry.ensemble_score(settings, current, version, member="embedding")
            if current_r1 is None:  # measured on another version: re-evaluate like with like
                previous = Embedder.load(registry.download(settings, current,
                                                           base / "models-cache"), settings)
                scores = evaluate_embedding(previous, trained["data"], ("test",),
                                            trained["features"])["test"]
                current_rows = registry.metric_rows(current, version, "test",
                                                    {"embedding": scores}, False)
                current_r1 = scores["top1"]
        prefix = registry.upload(settings, model_id, local)

        def decide(conn, current_now):
            return gate(new_r1, baseline_r1, current, current_now, current_r1,
                        settings.embedding_baseline_margin, settings.model_promotion_margin)

        promoted, reason = registry.complete(settings, model_id, rows + current_rows, config,
                                             decide, kind="embedding")
    except BaseException as exc:
        registry.fail(settings, model_id, "".join(traceback.format_exception_only(exc)).strip())
        raise
    return {"model_id": model_id, "kind": "embedding", "dataset_version": version,
            "backbone": config["backbone"], "artifact_prefix": prefix, "promoted": promoted,
            "reason": reason, "test": metrics["test"], "seconds": metrics["seconds"],
            "previous_model": current, "previous_r1_same_split": current_r1}

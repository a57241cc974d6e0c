"""An ensemble directory: its members' Keras files, label map and config; loading and predicting.

Layout (also what ``python -m modeling export`` writes and ``predict --model DIR`` reads)::

    ensemble.json            model_id, dataset_version, profile, members [{name, file, image_size}], tta
    labels.json              the dataset version's label map
    members/<name>.keras     each member: RGB photo in [0, 255] -> class probabilities
    metrics.json, report/    evaluation (when the model was evaluated)

The ensemble's probabilities are the average of its members' softmax outputs (and of the
mirrored photo's when test-time augmentation is on).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoplens.vision import images

ENSEMBLE_FILE = "ensemble.json"
# The layer between a member's pooled backbone features and its classifier (member_training).
HEAD_INPUT_LAYER = "head_dropout"


class EnsembleError(ValueError):
    """A directory is not a loadable ensemble."""


def is_ensemble_dir(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def save(out_dir: Path, config: dict, labels: dict, members: list) -> Path:
    """Write members (name, image_size, keras.Model) and the config; returns the directory."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "members").mkdir(exist_ok=True)
    entries = []
    for name, size, model in members:
        rel = f"members/{name}.keras"
        model.save(out_dir / rel)
        entries.append({"name": name, "file": rel, "image_size": int(size)})
    (out_dir / "labels.json").write_text(json.dumps(labels, ensure_ascii=False, indent=1))
    # Written last: a directory with ensemble.json is complete.
    (out_dir / ENSEMBLE_FILE).write_text(json.dumps({**config, "members": entries}, indent=1,
                                                    ensure_ascii=False))
    return out_dir


@dataclass
class Ensemble:
    root: Path
    config: dict
    labels: list[dict]
    models: list  # (name, image_size, keras.Model)

    @classmethod
    def load(cls, root: str | Path) -> "Ensemble":
        import keras

        import shoplens.vision.layers  # noqa: F401  (registers custom layers for deserialisation)

        root = Path(root)
        if not is_ensemble_dir(root):
            raise EnsembleError(f"{root} is not an ensemble directory ({ENSEMBLE_FILE} missing)")
        config = json.loads((root / ENSEMBLE_FILE).read_text())
        labels = json.loads((root / "labels.json").read_text())["labels"]
        models = []
        for m in config["members"]:
            path = root / m["file"]
            if not path.is_file():
                raise EnsembleError(f"{root}: member file {m['file']} is missing")
            models.append((m["name"], int(m["image_size"]), keras.saving.load_model(path, compile=False)))
        return cls(root, config, sorted(labels, key=lambda e: e["label"]), models)

    @property
    def model_id(self) -> str:
        return str(self.config.get("model_id", self.root.name))

    @property
    def tta(self) -> bool:
        return bool(self.config.get("tta", False))

    def member_probs(self, photos: list[bytes], names: list[str] | None = None,
                     tta: bool | None = None) -> dict[str, np.ndarray]:
        """Each member's class probabilities for encoded photos (raises UnreadableImage)."""
        names = names or [f"photo {i}" for i in range(len(photos))]
        decoded = [images.decode(data, name) for data, name in zip(photos, names)]
        return self.member_probs_decoded(decoded, tta)

    def member_probs_decoded(self, decoded: list, tta: bool | None = None) -> dict[str, np.ndarray]:
        """Each member's class probabilities for already decoded (upright RGB) PIL images."""
        tta = self.tta if tta is None else tta
        out = {}
        for name, size, model in self.models:
            m = images.margin_size(size)
            x = np.stack([images.centre_crop(images.fitted_square(img, m), size)
                          for img in decoded]).astype(np.float32)
            p = np.asarray(model.predict_on_batch(x))
            if tta:
                p = (p + np.asarray(model.predict_on_batch(x[:, :, ::-1]))) / 2
            out[name] = p
        return out

    def predict_probs(self, photos: list[bytes], names: list[str] | None = None) -> np.ndarray:
        return np.mean(list(self.member_probs(photos, names).values()), axis=0)

    def predict_probs_decoded(self, decoded: list) -> np.ndarray:
        return np.mean(list(self.member_probs_decoded(decoded).values()), axis=0)

    def backbone_weights(self, out_dir: str | Path, settings=None) -> dict[str, dict]:
        """Each member's fine-tuned backbone (its network up to the pooled features its
        classifier reads) as a weights file that the same backbone built afresh loads (an
        ``Embedder``'s ``weights_file`` or ``part_weights``): ``{member: {"file", "image_size"}}``.
        Checked on a batch of noise: the rebuilt backbone gives the member's own features."""
        import keras

        from shoplens.config import Settings
        from shoplens.vision import backbones

        fresh_settings = (settings or Settings()).with_overrides(model_init="random")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        noise = np.random.default_rng(0)
        out = {}
        for name, size, model in self.models:
            try:
                pooled = model.get_layer(HEAD_INPUT_LAYER).input
            except ValueError:
                raise EnsembleError(f"{self.root}: member {name} has no {HEAD_INPUT_LAYER} layer "
                                    "to take its backbone from") from None
            features = keras.Model(model.inputs, pooled)
            backbone = backbones.member(name).build(size, fresh_settings)
            try:
                backbone.set_weights(features.get_weights())
            except ValueError as exc:
                raise EnsembleError(f"{self.root}: member {name} is not a {name} backbone "
                                    f"({exc})") from None
            x = noise.uniform(0, 255, (2, size, size, 3)).astype(np.float32)
            want = np.asarray(features.predict_on_batch(x))
            if not np.allclose(np.asarray(backbone.predict_on_batch(x)), want, atol=1e-4):
                raise EnsembleError(f"{self.root}: member {name}'s backbone rebuilt from its "
                                    "weights computes other features")
            path = out_dir / f"{name}.weights.h5"
            backbone.save_weights(path)
            out[name] = {"file": str(path), "image_size": int(size)}
        return out

    def top_k(self, probs: np.ndarray, k: int = 3) -> list[dict]:
        order = np.argsort(-probs)[:k]
        return [{"label": int(i), "product_id": self.labels[i]["product_id"],
                 "name": self.labels[i]["name"], "prob": round(float(probs[i]), 6)}
                for i in order]

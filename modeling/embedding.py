"""Training photo embeddings for visual search (metric learning); the embedding itself, photos
-> vectors, is the core's :mod:`shoplens.vision.embedding`.

With the backbone frozen (:func:`train_embedding`), its features are computed once per photo
and view (clean + augmented) and the head trains on them in seconds, as ``member_training`` does
for the ensemble's heads. :func:`finetune_embedding` also adapts the backbone's top blocks, as the
ensemble's stage 2 does (measured on grocery in docs/benchmarks.md: it lifts seen products far
more than novel ones).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from shoplens.vision.embedding import _BATCH, Embedder, EmbeddingError, l2_normalise  # noqa: F401

log = logging.getLogger(__name__)


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

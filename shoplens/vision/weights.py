"""Where the seed profile's Keras ImageNet weights come from.

Production (a connected machine) may let Keras download them (``model_weights_download``). A
machine without internet points ``model_weights_dir`` at a folder of the standard Keras weight
files, or has them in Keras' own cache (``$KERAS_HOME/models``, default ``~/.keras/models``).
Neither present and no download allowed: a clear error naming the file and the places looked in.
"""
from __future__ import annotations

import os
from pathlib import Path

from shoplens.config import Settings

# The file names keras.applications downloads (include_top=False variants).
KERAS_WEIGHT_FILES = {
    "vgg19": "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "resnet50": "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "mobilenetv3large": "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5",
}


class WeightsUnavailable(FileNotFoundError):
    """ImageNet weights are needed but cannot be found and may not be downloaded."""


def keras_cache_dir() -> Path:
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home) / "models"


def resolve(arch: str, settings: Settings) -> str | None:
    """What to pass as ``weights=`` to keras.applications for ``arch``.

    A file path when the standard file is found locally, ``"imagenet"`` when downloading is
    allowed, ``None`` when the settings ask for random initialisation (tests, CI).
    """
    if settings.model_init == "random":
        return None
    if settings.model_init != "imagenet":
        raise ValueError(f"model_init must be 'imagenet' or 'random', got {settings.model_init!r}")
    filename = KERAS_WEIGHT_FILES[arch]
    places = ([Path(settings.model_weights_dir)] if settings.model_weights_dir else []) + \
        [keras_cache_dir()]
    for folder in places:
        if (folder / filename).is_file():
            return str(folder / filename)
    if settings.model_weights_download:
        return "imagenet"
    raise WeightsUnavailable(
        f"ImageNet weights for {arch} not found: looked for {filename} in "
        f"{', '.join(str(p) for p in places)}. Put the standard Keras weight file there "
        "(SHOPLENS_MODEL_WEIGHTS_DIR), allow the download on a connected machine "
        "(SHOPLENS_MODEL_WEIGHTS_DOWNLOAD=1), or use the offline profile "
        "(SHOPLENS_MODEL_PROFILE=offline).")

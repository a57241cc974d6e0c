"""Can a small classifier tell the replica's generated products apart?

Trains a tiny Keras CNN (64x64 input) on a per-product 70/30 split of the generated photo set's
learnable products and reports held-out accuracy next to the chance baseline (1 / products).
Writes results/replica_learnability.json.

    .venv/bin/python benchmarks/replica_learnability.py [--seed 0] [--epochs 30]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from crawler.replica.synthetic import synthetic_sources  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=REPO / "results" / "replica_learnability.json")
    args = parser.parse_args()

    import keras

    sources = [s for s in synthetic_sources(args.seed, args.cache_dir) if len(s.photos) >= 3]
    rng = random.Random(args.seed)
    train_x, train_y, test_x, test_y = [], [], [], []
    for label, source in enumerate(sources):
        photos = list(source.photos)
        rng.shuffle(photos)
        cut = max(1, int(len(photos) * 0.7))
        for i, path in enumerate(photos):
            pixels = np.asarray(Image.open(path).convert("RGB").resize((64, 64)), np.float32) / 255
            (train_x if i < cut else test_x).append(pixels)
            (train_y if i < cut else test_y).append(label)
    keras.utils.set_random_seed(args.seed)
    model = keras.Sequential([
        keras.Input((64, 64, 3)),
        keras.layers.RandomFlip("horizontal_and_vertical"),
        keras.layers.RandomRotation(0.5),
        keras.layers.Conv2D(32, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.MaxPooling2D(),
        keras.layers.Conv2D(64, 3, activation="relu"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(len(sources), activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(np.stack(train_x), np.array(train_y), epochs=args.epochs, batch_size=32, verbose=2)
    _, accuracy = model.evaluate(np.stack(test_x), np.array(test_y), verbose=0)
    result = {"products": len(sources), "train_photos": len(train_x), "test_photos": len(test_x),
              "epochs": args.epochs, "held_out_accuracy": round(float(accuracy), 4),
              "chance_accuracy": round(1 / len(sources), 4)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

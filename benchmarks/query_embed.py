"""A query photo's embedding: the Keras network against the frozen network (ONNX, run by
onnxruntime) the search service now uses (``catalogue_index.load_for_queries``), in one process on one thread:

    TF_NUM_INTRAOP_THREADS=1 TF_NUM_INTEROP_THREADS=1 \\
        .venv/bin/python benchmarks/query_embed.py [--backbone efficientnet_lite0+efficientnet_lite1+efficientnet_lite2] [--size 0] [--rounds 30]

- first query in a fresh process (TensorFlow imported, nothing built): Keras builds its
  network (what every service reload and every ``search`` command paid), the frozen network is
  imported from a cache folder the run fills first (as the nightly refresh leaves it); three
  child processes each, alternating;
- then single-photo embeddings (decoded 640x480 photos, as ``embed_decoded`` gets them),
  alternating the two, median and p95 ms;
- the largest difference between their vectors (float noise: batch norm folded).

Writes ``results/query_embed.json``.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=0,
                    help="crop size (0: each backbone's native size, as the search runs them)")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--out", default=str(REPO / "results" / "query_embed.json"))
    ap.add_argument("--first", nargs=2, metavar=("KIND", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.first:
        return first_query(args, *args.first)

    import numpy as np
    from PIL import Image

    from shoplens.config import Settings
    from shoplens.vision.embedding import Embedder

    settings = Settings.from_env()
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8))
              for _ in range(8)]
    load = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shoplens-query-embed-") as cache:
        # The refresh's part: freeze the network into the cache once (not timed).
        Embedder(args.backbone, args.size, settings=settings).cache_network(cache).prepare_network()

        first = {"keras": [], "frozen": []}
        for _ in range(3):
            for kind in first:
                child = subprocess.run(
                    [sys.executable, __file__, "--backbone", args.backbone, "--size",
                     str(args.size), "--first", kind, cache], capture_output=True, text=True,
                    check=True)
                first[kind].append(json.loads(child.stdout.strip().splitlines()[-1])["s"])
        keras = Embedder(args.backbone, args.size, settings=settings)
        reference = keras.embed_decoded(photos[:1])
        frozen = Embedder(args.backbone, args.size, settings=settings).cache_network(cache)
        vector = frozen.embed_decoded(photos[:1])
        difference = float(np.abs(reference - vector).max())

        times = {"keras": [], "frozen": []}
        for r in range(args.rounds):
            photo = photos[r % len(photos):r % len(photos) + 1]
            for name, embedder in (("keras", keras), ("frozen", frozen)):
                t0 = time.perf_counter()
                embedder.embed_decoded(photo)
                times[name].append((time.perf_counter() - t0) * 1000)

    def stats(values):
        return {"median_ms": round(float(np.median(values)), 2),
                "p95_ms": round(float(np.percentile(values, 95)), 2)}

    result = {"backbone": args.backbone, "image_size": args.size, "rounds": args.rounds,
              "first_query_s": {k: [round(x, 3) for x in v] for k, v in first.items()},
              "single_photo": {name: stats(v) for name, v in times.items()},
              "frozen_to_keras": {
                  "median": round(float(np.median(times["frozen"]) / np.median(times["keras"])), 3),
                  "p95": round(float(np.percentile(times["frozen"], 95)
                                     / np.percentile(times["keras"], 95)), 3)},
              "max_abs_difference": difference,
              "threads": {k: os.environ.get(k) for k in ("TF_NUM_INTRAOP_THREADS",
                                                         "TF_NUM_INTEROP_THREADS")},
              "load_average": [round(x, 2) for x in load + os.getloadavg()],
              "command": "benchmarks/query_embed.py " + " ".join(sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


def first_query(args, kind: str, cache: str) -> int:
    """Child: seconds from an unbuilt embedder to the first query photo's vector."""
    import numpy as np
    import tensorflow as tf  # noqa: F401 - imported before the clock, as a serving process has
    from PIL import Image

    from shoplens.config import Settings
    from shoplens.vision.embedding import Embedder

    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), np.uint8))
    t0 = time.perf_counter()
    embedder = Embedder(args.backbone, args.size, settings=Settings.from_env())
    if kind == "frozen":
        embedder.cache_network(cache)
    embedder.embed_decoded([photo])
    print(json.dumps({"s": time.perf_counter() - t0}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

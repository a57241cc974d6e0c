"""Acceptance 4: the whole filter's cost per image as a ratio of bare onnxruntime inference.

    .venv/bin/python benchmarks/filter.py [--shared ../shared] [--images 120] [--repeats 5]

Same images, same process, one onnxruntime session (so the same session options and thread pool)
for both sides:
- bare inference: what any user of the model must do at minimum, from the image's bytes: decode,
  letterbox to 416, ``session.run``. The decode and letterbox are the filter's own functions
  (``open_for_model``, ``fit_for_model``, ``tensor_from_fitted``), so the shared part costs the
  same on both sides;
- filter: everything the nightly stage does per image from its stored bytes
  (``dataset.filter.stage.features_for``: decode, letterbox, inference, grid decoding + NMS of every box
  >= 0.05, image statistics; then every rule and the verdict).
Manifest and object-store I/O are left out of both (they depend on the deployment, not on code).
Each image is timed on both sides back to back, the side that goes first alternating per image and
per repeat (so load from other processes, and warm caches, hit both alike); times are summed per
repeat. The ratio quoted is the median over repeats of the per-repeat ratio; the spread (min, max)
is reported with it. ``session_run_ms_per_image`` (the ``session.run`` call alone, timed inside
the bare side) is given for reference. Writes results/filter.json.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dataset.filter import rules  # noqa: E402
from shoplens.vision.detector import (Detector, fit_for_model, open_for_model,  # noqa: E402
                              tensor_from_fitted)
from dataset.filter.stage import features_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(REPO / "results" / "filter.json"))
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    model = shared / "models" / "yolox_nano.onnx"
    pools = [shared / "datasets" / "ikea" / "images" / d for d in ("room_scenes", "chair", "bed")]
    pools.append(shared / "datasets" / "grocery" / "val")
    if not model.is_file() or not all(p.is_dir() for p in pools):
        print(f"needs {model} and the ikea/grocery datasets under {shared} (absent)", file=sys.stderr)
        return 2
    rng = random.Random(3)
    per_pool = args.images // len(pools)
    paths = [p for pool in pools for p in rng.sample(sorted(pool.rglob("*.jpg")), per_pool)]
    payloads = [p.read_bytes() for p in paths]
    detector = Detector(model, min_score=0.05)
    params = rules.RuleParams()

    def bare_one(i: int) -> tuple[float, float]:
        """(whole bare inference, session.run alone) in seconds."""
        start = time.perf_counter()
        image, size = open_for_model(payloads[i])
        fitted, _ = fit_for_model(image, size)
        tensor = tensor_from_fitted(fitted)
        before_run = time.perf_counter()
        detector.infer(tensor)
        end = time.perf_counter()
        return end - start, end - before_run

    def filter_one(i: int) -> float:
        start = time.perf_counter()
        rules.verdict(rules.decide(features_for(detector, payloads[i]), params))
        return time.perf_counter() - start

    for i in range(min(5, len(payloads))):  # warm-up: onnxruntime arenas, PIL codecs
        bare_one(i), filter_one(i)
    bare_times, session_times, filter_times = [], [], []
    for repeat in range(args.repeats):
        bare_total = session_total = filter_total = 0.0
        for i in range(len(payloads)):
            if (i + repeat) % 2:
                filter_total += filter_one(i)
                bare, session = bare_one(i)
            else:
                bare, session = bare_one(i)
                filter_total += filter_one(i)
            bare_total += bare
            session_total += session
        bare_times.append(bare_total)
        session_times.append(session_total)
        filter_times.append(filter_total)
    n = len(payloads)
    ratios = [f / b for f, b in zip(filter_times, bare_times)]
    import onnxruntime
    result = {
        "command": "benchmarks/filter.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "images": n, "repeats": args.repeats, "detector_version": detector.version,
        "onnxruntime": onnxruntime.__version__,
        "intra_op_threads": detector.session.get_session_options().intra_op_num_threads,
        "bare_inference_ms_per_image": round(statistics.median(bare_times) / n * 1000, 2),
        "session_run_ms_per_image": round(statistics.median(session_times) / n * 1000, 2),
        "filter_ms_per_image": round(statistics.median(filter_times) / n * 1000, 2),
        "ratio_filter_over_bare": round(statistics.median(ratios), 3),
        "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
        "ratio_filter_over_session_run": round(
            statistics.median(f / s for f, s in zip(filter_times, session_times)), 3),
        "target_ratio": 1.3,
        "ratio_per_repeat": [round(r, 3) for r in ratios],
        "bare_runs_s": [round(t, 3) for t in bare_times],
        "session_runs_s": [round(t, 3) for t in session_times],
        "filter_runs_s": [round(t, 3) for t in filter_times],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

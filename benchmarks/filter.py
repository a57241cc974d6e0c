"""Acceptance 4: the whole filter's cost per image as a ratio of bare onnxruntime inference.

    .venv/bin/python benchmarks/filter.py [--shared ../shared] [--images 120] [--repeats 3]

Same images, same process, same session, one thread pool:
- baseline: ``session.run`` on input tensors prepared beforehand (bare inference);
- filter: everything the stage does per image from its stored bytes: decode, letterbox,
  inference, grid decoding + NMS, image statistics, all rules, verdict.
Manifest and object-store I/O are left out of both (they depend on the deployment, not on code).
Timed per image, alternating bare and filter (so load from other processes on a shared machine
hits both alike), summed per repeat; the medians over ``--repeats`` give the ratio. Writes
results/filter.json.
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

from dataset import rules  # noqa: E402
from dataset.detector import Detector, letterbox, open_image  # noqa: E402
from dataset.filter import features_for  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=3)
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
    tensors = [letterbox(open_image(data))[0] for data in payloads]

    def bare_one(i: int) -> float:
        start = time.perf_counter()
        detector.infer(tensors[i])
        return time.perf_counter() - start

    def filter_one(i: int) -> float:
        start = time.perf_counter()
        rules.verdict(rules.decide(features_for(detector, payloads[i]), params))
        return time.perf_counter() - start

    for i in range(min(5, len(payloads))):  # warm-up: onnxruntime arenas, PIL codecs
        bare_one(i), filter_one(i)
    # Paired, alternating per image, so load from other processes hits both sides alike.
    bare_times, filter_times = [], []
    for _ in range(args.repeats):
        bare_total = filter_total = 0.0
        for i in range(len(payloads)):
            bare_total += bare_one(i)
            filter_total += filter_one(i)
        bare_times.append(bare_total)
        filter_times.append(filter_total)
    n = len(payloads)
    result = {
        "command": "benchmarks/filter.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "images": n, "repeats": args.repeats, "detector_version": detector.version,
        "bare_inference_ms_per_image": round(statistics.median(bare_times) / n * 1000, 2),
        "filter_ms_per_image": round(statistics.median(filter_times) / n * 1000, 2),
        "ratio_filter_over_bare": round(statistics.median(filter_times) / statistics.median(bare_times), 3),
        "target_ratio": 1.3,
        "bare_runs_s": [round(t, 3) for t in bare_times],
        "filter_runs_s": [round(t, 3) for t in filter_times],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

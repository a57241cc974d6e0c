"""Benchmark: `python -m modeling predict --json` on a directory of 1,000 photos.

Makes a folder of 1,000 real phone photos from ../shared/datasets/grocery (mostly JPEG, every
10th re-encoded as PNG, every 10th+5 as WebP, every 25th stored sideways with an EXIF rotation),
runs the real CLI on it as a subprocess and checks that every photo is answered. The baseline,
measured in the same run on the same machine, is the naive way: one photo at a time through the
same ensemble (no batching, no decode pool). Results go to results/predict.json.

    .venv/bin/python benchmarks/predict.py --model .run/train_grocery/ensemble
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GROCERY = Path(os.environ.get("SHOPLENS_SHARED_DIR", REPO.parent / "shared")) / "datasets" / "grocery"


def make_photo_dir(target: Path, count: int) -> list[Path]:
    from PIL import Image

    sources = sorted((GROCERY / "train").rglob("*.jpg")) + sorted((GROCERY / "val").rglob("*.jpg"))
    sources = (sources * (count // len(sources) + 1))[:count]
    out = []
    for i, src in enumerate(sources):
        if i % 10 == 0:
            dest = target / f"{i:04d}.png"
            Image.open(src).save(dest)
        elif i % 10 == 5:
            dest = target / f"{i:04d}.webp"
            Image.open(src).save(dest, quality=90)
        elif i % 25 == 1:
            dest = target / f"{i:04d}.jpg"
            exif = Image.Exif()
            exif[0x0112] = 8  # viewer rotates 90 degrees counter-clockwise to show it upright
            Image.open(src).rotate(-90, expand=True).save(dest, exif=exif, quality=92)
        else:
            dest = target / f"{i:04d}.jpg"
            dest.write_bytes(src.read_bytes())
        out.append(dest)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=REPO / ".run" / "train_grocery" / "ensemble")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--baseline-count", type=int, default=100)
    ap.add_argument("--results", type=Path, default=REPO / "results" / "predict.json")
    args = ap.parse_args()
    if not GROCERY.is_dir():
        print(f"skipped: needs {GROCERY} (absent on this machine)")
        return 0
    if not (args.model / "ensemble.json").is_file():
        print(f"error: {args.model} is not an ensemble directory; run benchmarks/train_grocery.py "
              "first or pass --model DIR", file=sys.stderr)
        return 2

    from modeling.ensemble import Ensemble
    from shoplens.vision import images

    with tempfile.TemporaryDirectory(prefix="shoplens-predict-") as tmp:
        photos = make_photo_dir(Path(tmp), args.count)
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "modeling", "predict", "--json",
                               "--model", str(args.model), tmp],
                              capture_output=True, text=True, env=env, cwd=REPO)
        cli_wall = time.monotonic() - t0
        answers = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
        if proc.returncode != 0 or len(answers) != len(photos):
            print(proc.stderr[-3000:], file=sys.stderr)
            print(f"error: CLI exit {proc.returncode}, {len(answers)} answers for {len(photos)} photos",
                  file=sys.stderr)
            return 1

        t_load = time.monotonic()
        ens = Ensemble.load(args.model)
        load_seconds = time.monotonic() - t_load
        ens.predict_probs([images.read_file(photos[0])])  # warm-up (graph tracing)
        t1 = time.monotonic()
        for path in photos[:args.baseline_count]:
            ens.predict_probs([images.read_file(path)], [str(path)])
        naive_rate = args.baseline_count / (time.monotonic() - t1)

    cli_rate = len(photos) / cli_wall
    steady_rate = len(photos) / max(1e-9, cli_wall - load_seconds)
    result = {
        "benchmark": "predict", "photos": len(photos), "model": str(args.model),
        "members": [m["name"] for m in json.loads((args.model / "ensemble.json").read_text())["members"]],
        "cli_wall_seconds": round(cli_wall, 2), "cli_photos_per_second": round(cli_rate, 2),
        "model_load_seconds_in_process": round(load_seconds, 2),
        "cli_photos_per_second_excluding_load": round(steady_rate, 2),
        "baseline_one_at_a_time_photos_per_second": round(naive_rate, 2),
        "baseline_photos": args.baseline_count,
        "speedup_vs_one_at_a_time": round(steady_rate / naive_rate, 2),
        "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

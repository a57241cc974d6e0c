"""Compare two benchmarks/train_grocery.py results files photo by photo.

Both runs must have been tested on the same photos (for example the two arms of
`--holdout val-halves`). Prints and writes, for Top-1 and Top-3, how many photos each run gets
right, how many the second run fixes and how many it breaks; totals alone hide that.

    python benchmarks/compare_predictions.py results/a.json results/b.json [--results out.json]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _hits(predictions: list[dict], k: int) -> dict[str, bool]:
    return {p["photo"]: p["label"] in p["top3"][:k] for p in predictions}


def compare(before: list[dict], after: list[dict]) -> dict:
    """Per-photo comparison of two `test_predictions` lists; ValueError unless they cover the
    same photos with the same labels."""
    truth_before = {p["photo"]: p["label"] for p in before}
    truth_after = {p["photo"]: p["label"] for p in after}
    if len(truth_before) != len(before) or len(truth_after) != len(after):
        raise ValueError("a results file lists a test photo twice")
    if truth_before != truth_after:
        only = sorted(set(truth_before) ^ set(truth_after))
        relabelled = sorted(p for p in set(truth_before) & set(truth_after)
                            if truth_before[p] != truth_after[p])
        raise ValueError(f"the two runs were not tested on the same photos: {len(only)} photo(s) in "
                         f"only one run (e.g. {only[:3]}), {len(relabelled)} with different labels")
    out = {"n": len(truth_before)}
    for k in (1, 3):
        a, b = _hits(before, k), _hits(after, k)
        out[f"top{k}"] = {
            "before": sum(a.values()), "after": sum(b.values()),
            "fixed": sorted(p for p in a if b[p] and not a[p]),
            "broken": sorted(p for p in a if a[p] and not b[p]),
        }
    return out


def _predictions(path: Path) -> list[dict]:
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SystemExit(f"error: cannot read {path}: {exc}")
    if "test_predictions" not in result:
        raise SystemExit(f"error: {path} has no test_predictions (written by an older "
                         "train_grocery.py?)")
    return result["test_predictions"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--results", type=Path, help="also write the comparison here as JSON")
    args = parser.parse_args(argv)
    try:
        result = compare(_predictions(args.before), _predictions(args.after))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = result["n"]
    for k in (1, 3):
        r = result[f"top{k}"]
        print(f"top{k}: {r['before']}/{n} -> {r['after']}/{n}  "
              f"fixed {len(r['fixed'])}, broken {len(r['broken'])}")
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(
            {"before": str(args.before), "after": str(args.after), **result}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

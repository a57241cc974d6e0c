"""Acceptance 1: the filter's rules measured on ../shared/datasets/ikea (+ a grocery keep rate).

    .venv/bin/python benchmarks/filter_ikea.py [--shared ../shared] [--out results/filter_ikea.json]
        [--work results/filter_ikea_work]

Sets (every image is assigned to the "tune" or the "report" half by a hash of its file name; the
thresholds in dataset/filter/rules.py were chosen on "tune" only, the numbers to quote are "report"):
- multi-product: room scenes must be rejected; single-product studio photos (bed, chair, couch,
  dining table, plant_pot) must pass.
- occupancy, both sides from the same studio photos: the product trimmed to its own extent plus a
  5 % margin must pass; the product cut out (non-white pixels) and pasted small (8-30 % of the
  frame by its bounding box) onto a plain colour or onto a crop of a room scene must be rejected.
- large on room: the same cut-out pasted large (55-85 % of the frame by its box) onto a crop of a
  room scene: a home photo of one product filling the frame (the multi-product rule should let it
  pass; furniture of the room around it makes that hard).
  The product extent is annotated from pure-white studio pixels (min channel < 240), not by the
  filter's own estimator.
- grocery: share of real phone photos (val split) the whole filter keeps.
Features (detections + image statistics) are computed once per image; the rules then run on them.
With ``--work DIR`` they are also cached on disk, keyed by the sha256 of the bytes the filter sees
(made-up images are deterministic for a seed) and the detector and statistics versions, so a
second run with changed rules costs no detector pass.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shoplens.vision.detector import Detector  # noqa: E402
from dataset.filter.stage import features_for  # noqa: E402
from dataset.filter import rules  # noqa: E402
from dataset.filter.occupancy import FEATURES_VERSION  # noqa: E402

STUDIO_DIRS = ("bed", "chair", "couch", "dining table", "plant_pot")
MARGIN = 0.05
FRAME_SIZES = ((640, 640), (640, 480), (480, 640))
# A single product filling the frame in front of a room: what a home review photo of one piece of
# furniture looks like (the multi-product rule must let it pass).
LARGE_SHARE = (0.55, 0.85)


def split_of(name: str) -> str:
    return "tune" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2 == 0 else "report"


def product_mask(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB")).min(axis=2) < 240


def trimmed(img: Image.Image) -> Image.Image | None:
    mask = product_mask(img)
    ys, xs = np.nonzero(mask)
    if len(xs) < 50:
        return None
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    mx, my = int((x2 - x1) * MARGIN), int((y2 - y1) * MARGIN)
    w, h = img.size
    # Pad with white where the margin leaves the photo (the studio backdrop is white).
    canvas = Image.new("RGB", (x2 - x1 + 2 * mx, y2 - y1 + 2 * my), (255, 255, 255))
    crop = img.convert("RGB").crop((max(0, x1 - mx), max(0, y1 - my), min(w, x2 + mx), min(h, y2 + my)))
    canvas.paste(crop, (max(0, x1 - mx) - (x1 - mx), max(0, y1 - my) - (y1 - my)))
    return canvas


def pasted_small(img: Image.Image, background: Image.Image, rng: random.Random,
                 share: tuple[float, float] = (0.08, 0.30)) -> Image.Image | None:
    mask = product_mask(img)
    ys, xs = np.nonzero(mask)
    if len(xs) < 50:
        return None
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    product = img.convert("RGB").crop((x1, y1, x2, y2))
    alpha = Image.fromarray((mask[y1:y2, x1:x2] * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
    fw, fh = background.size
    target = rng.uniform(*share) * fw * fh  # bounding-box share of the frame
    scale = min((target / (product.width * product.height)) ** 0.5,
                0.95 * fw / product.width, 0.95 * fh / product.height)
    size = (max(1, int(product.width * scale)), max(1, int(product.height * scale)))
    product, alpha = product.resize(size, Image.BILINEAR), alpha.resize(size, Image.BILINEAR)
    frame = background.copy()
    frame.paste(product, (rng.randrange(0, fw - size[0] + 1), rng.randrange(0, fh - size[1] + 1)), alpha)
    return frame


def plain_background(rng: random.Random) -> Image.Image:
    size = rng.choice(FRAME_SIZES)
    colour = tuple(rng.randrange(30, 256) for _ in range(3))
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 3, (size[1], size[0], 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8))


def room_background(rooms: list[Path], rng: random.Random) -> Image.Image:
    size = rng.choice(FRAME_SIZES)
    room = Image.open(rng.choice(rooms)).convert("RGB")
    scale = max(size[0] / room.width, size[1] / room.height) * rng.uniform(1.0, 1.6)
    room = room.resize((int(room.width * scale) + 1, int(room.height * scale) + 1), Image.BILINEAR)
    x, y = rng.randrange(0, room.width - size[0] + 1), rng.randrange(0, room.height - size[1] + 1)
    return room.crop((x, y, x + size[0], y + size[1]))


def image_bytes(img: Image.Image | Path) -> bytes:
    """The bytes the filter sees: the file's, or a made-up image JPEG-encoded as a crawled photo
    would be."""
    if isinstance(img, Path):
        return img.read_bytes()
    out = io.BytesIO()
    img.convert("RGB").save(out, "JPEG", quality=92)
    return out.getvalue()


class FeatureCache:
    """Features by the sha256 of the image bytes, in one JSON-lines file per detector and statistics
    version under ``work`` (appended as computed: an interrupted run keeps what it did). Without
    ``work`` it only computes."""

    def __init__(self, detector: Detector, work: Path | None):
        self.detector, self.known, self.file = detector, {}, None
        self.hits = self.misses = 0
        if work is not None:
            tag = hashlib.sha256(f"{detector.version}|{FEATURES_VERSION}|{detector.min_score}"
                                 .encode()).hexdigest()[:16]
            work.mkdir(parents=True, exist_ok=True)
            self.file = work / f"features-{tag}.jsonl"
            if self.file.is_file():
                for line in self.file.read_text().splitlines():
                    try:
                        row = json.loads(line)
                    except ValueError:  # a line cut short by an interrupted run
                        continue
                    self.known[row["sha256"]] = row["features"]

    def features(self, img: Image.Image | Path) -> rules.Features:
        data = image_bytes(img)
        key = hashlib.sha256(data).hexdigest()
        if key in self.known:
            self.hits += 1
            return rules.Features(**self.known[key])
        self.misses += 1
        f = features_for(self.detector, data)
        self.known[key] = f.__dict__
        if self.file is not None:
            with open(self.file, "a") as fh:
                fh.write(json.dumps({"sha256": key, "features": f.__dict__}) + "\n")
        return f


def confusion(should_reject: list[bool], rejected: list[bool]) -> dict:
    tp = sum(s and r for s, r in zip(should_reject, rejected))
    fp = sum((not s) and r for s, r in zip(should_reject, rejected))
    fn = sum(s and not r for s, r in zip(should_reject, rejected))
    tn = sum((not s) and not r for s, r in zip(should_reject, rejected))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / (tp + fn), 4) if tp + fn else None,
            "specificity": round(tn / (tn + fp), 4) if tn + fp else None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=str(REPO.parent / "shared"))
    ap.add_argument("--out", default=str(REPO / "results" / "filter_ikea.json"))
    ap.add_argument("--grocery", type=int, default=296, help="grocery val photos to sample")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", default=None,
                    help="cache features here (per image bytes and detector version) across runs")
    args = ap.parse_args(argv)
    shared = Path(args.shared)
    ikea = shared / "datasets" / "ikea" / "images"
    model = shared / "models" / "yolox_nano.onnx"
    if not ikea.is_dir() or not model.is_file():
        print(f"needs {ikea} and {model} (absent on this machine)", file=sys.stderr)
        return 2
    detector = Detector(model)
    cache = FeatureCache(detector, Path(args.work) if args.work else None)
    rng = random.Random(args.seed)
    large_rng = random.Random(args.seed + 1)
    rooms = sorted((ikea / "room_scenes").glob("*.jpg"))
    samples: list[dict] = []  # {"set", "split", "name", "features"}

    def add(set_name: str, name: str, img: Image.Image | Path) -> None:
        samples.append({"set": set_name, "split": split_of(name), "name": name,
                        "features": cache.features(img)})

    started = time.perf_counter()
    for room in rooms:
        add("room", room.name, room)
    for folder in STUDIO_DIRS:
        for path in sorted((ikea / folder).glob("*.jpg")):
            img = Image.open(path).convert("RGB")
            name = f"{folder}/{path.name}"
            add(f"studio:{folder}", name, path)
            trim = trimmed(img)
            if trim is not None:
                add(f"trimmed:{folder}", name, trim)
                # Room backgrounds come from rooms of the same half, so nothing leaks across.
                same_half = [r for r in rooms if split_of(r.name) == split_of(name)]
                add(f"pasted_plain:{folder}", name, pasted_small(img, plain_background(rng), rng))
                add(f"pasted_room:{folder}", name, pasted_small(img, room_background(same_half, rng), rng))
                # Its own generator, so the sets above stay what they were before this one existed.
                add(f"large_on_room:{folder}", name,
                    pasted_small(img, room_background(same_half, large_rng), large_rng, LARGE_SHARE))
    grocery_root = shared / "datasets" / "grocery"
    grocery_lines = (grocery_root / "val.txt").read_text().splitlines()
    for line in random.Random(args.seed).sample(grocery_lines, min(args.grocery, len(grocery_lines))):
        rel = line.split(",")[0].strip()
        add("grocery", rel, grocery_root / rel)
    feature_seconds = time.perf_counter() - started

    params = rules.RuleParams()
    # The multi-product rule with each rules-3 step switched off in turn (and all: rules-2's count).
    ablations = {"without_scene_min_score": {"scene_min_score": params.min_score},
                 "without_scene_repeats": {"scene_repeats": 0},
                 "without_scene_max_share": {"scene_max_share": 0.0},
                 "rules_2_count": {"scene_min_score": params.min_score, "scene_repeats": 0,
                                   "scene_max_share": 0.0}}
    result: dict = {"command": "benchmarks/filter_ikea.py", "rules_version": rules.RULES_VERSION,
                    "detector_version": detector.version, "params": params.as_json(),
                    "images": len(samples), "feature_seconds": round(feature_seconds, 1),
                    "features_cached": cache.hits, "features_computed": cache.misses, "splits": {}}
    for split in ("tune", "report", "all"):
        chosen = [s for s in samples if split == "all" or s["split"] == split]
        by_set: dict[str, list[list[rules.Decision]]] = {}
        for s in chosen:
            by_set.setdefault(s["set"], []).append(rules.decide(s["features"], params))

        def rejected_by(rule: str, set_prefix: str) -> list[bool]:
            return [not next(d for d in ds if d.rule == rule).passed
                    for name, group in by_set.items() if name.split(":")[0] == set_prefix
                    for ds in group]

        def keep_rate(set_prefix: str) -> float | None:
            verdicts = [rules.verdict(ds)[0] == "keep" for name, group in by_set.items()
                        if name.split(":")[0] == set_prefix for ds in group]
            return round(sum(verdicts) / len(verdicts), 4) if verdicts else None

        rooms_rej, studio_rej = rejected_by("multi_product", "room"), rejected_by("multi_product", "studio")
        large_rej = rejected_by("multi_product", "large_on_room")
        ablation = {}
        for label, change in ablations.items():
            changed = dataclasses.replace(params, **change)

            def rate(prefix: str) -> float:
                chosen_set = [s for s in chosen if s["set"].split(":")[0] == prefix]
                return round(sum(not rules.multi_product(s["features"], changed).passed
                                 for s in chosen_set) / max(1, len(chosen_set)), 4)
            ablation[label] = {"rooms_rejected": rate("room"), "studio_rejected": rate("studio"),
                               "large_on_room_rejected": rate("large_on_room"),
                               "grocery_rejected": rate("grocery")}
        trim_rej = rejected_by("occupancy", "trimmed")
        small_rej = rejected_by("occupancy", "pasted_plain") + rejected_by("occupancy", "pasted_room")
        per_set = {}
        for name, group in sorted(by_set.items()):
            per_set[name] = {"n": len(group), **{
                f"{rule}_pass": round(sum(next(d for d in ds if d.rule == rule).passed
                                          for ds in group) / len(group), 4)
                for rule in rules.RULE_NAMES}, "keep": round(
                    sum(rules.verdict(ds)[0] == "keep" for ds in group) / len(group), 4)}
        result["splits"][split] = {
            "multi_product": {**confusion([True] * len(rooms_rej) + [False] * len(studio_rej),
                                          rooms_rej + studio_rej),
                              "rooms_rejected": round(sum(rooms_rej) / max(1, len(rooms_rej)), 4),
                              "studio_passed": round(1 - sum(studio_rej) / max(1, len(studio_rej)), 4),
                              "large_on_room_passed": round(1 - sum(large_rej) / max(1, len(large_rej)), 4),
                              "ablation": ablation},
            "occupancy": {**confusion([True] * len(small_rej) + [False] * len(trim_rej),
                                      small_rej + trim_rej),
                          "pasted_small_rejected": round(sum(small_rej) / max(1, len(small_rej)), 4),
                          "pasted_plain_rejected": round(
                              sum(rejected_by("occupancy", "pasted_plain"))
                              / max(1, len(rejected_by("occupancy", "pasted_plain"))), 4),
                          "pasted_room_rejected": round(
                              sum(rejected_by("occupancy", "pasted_room"))
                              / max(1, len(rejected_by("occupancy", "pasted_room"))), 4),
                          "trimmed_passed": round(1 - sum(trim_rej) / max(1, len(trim_rej)), 4)},
            "keep_rate": {k: keep_rate(k) for k in ("room", "studio", "trimmed", "pasted_plain",
                                                     "pasted_room", "large_on_room", "grocery")},
            "per_set": per_set,
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    features_out = out.with_name(out.stem + "_features.json")
    features_out.write_text(json.dumps([{**{k: v for k, v in s.items() if k != "features"},
                                         "features": s["features"].__dict__} for s in samples]))
    print(json.dumps({k: {"multi_product": result["splits"][k]["multi_product"],
                          "keep_rate": result["splits"][k]["keep_rate"]}
                      for k in ("tune", "report")}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

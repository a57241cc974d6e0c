"""Benchmark: the filter's salvage of multi-product photos on the IKEA pasted-product set (issue 17).

    nice -n 10 env TF_NUM_INTRAOP_THREADS=2 .venv/bin/python benchmarks/salvage.py \
        [--shared ../shared] [--photos 300] [--out results/salvage]

Each made-up review photo shows two IKEA studio products of different classes (bed, chair, clock,
couch, dining table, plant_pot), cut out of their white backdrop (as in benchmarks/filter_ikea.py),
mirrored at random, lit 0.85-1.15x, scaled to 60-100 % of a half frame and pasted side by side onto
a crop of a room scene or a plain colour. The reviewed product is one of the two ("present", 2 of
3 photos) or a third product not in view ("absent": any crop salvaged from it is a wrong label).
Its references are what the nightly salvage would have for an IKEA product: its catalogue image
(the studio photo, unmirrored, on white).

Every photo goes through the production path: the detector and the rules
(``dataset.filter.stage.features_for``, ``rules.decide``); a photo rejected as multi-product (and at most occupancy, the salvage's
default ``salvage_despite_rules``) goes through the salvage's own steps (``salvage.salvage_boxes``, ``shoplens.vision.crops.crop``,
``salvage.choose``; every crop's score is kept so thresholds can be swept) with the untrained Lite0
embedding (the baseline the nightly uses before an embedding is promoted). A salvaged crop's label is right when
its box overlaps the reviewed product's pasted rectangle more than the other one's (IoU > 0.1).

Photos are split into a tune and a report half by a hash of their name; the default threshold
and gap (``salvage_threshold``, ``salvage_min_gap``) were chosen on the tune half; quote report.
Written under --out: ``salvage.json`` (counts, precision, a threshold sweep on both halves),
``sample.html`` and ``sample.png`` (a hand-checkable sample of salvaged crops: photo with the crop
drawn, the crop, the reviewed product's catalogue image, right/wrong) and the embedding cache.
"""
from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from filter_ikea import plain_background, product_mask, room_background, split_of  # noqa: E402
from dataset.filter import rules, salvage  # noqa: E402
from dataset.filter.stage import features_for  # noqa: E402
from shoplens.config import Settings  # noqa: E402
from shoplens.photos import decode_photo, encode_jpeg  # noqa: E402
from shoplens.vision.crops import crop  # noqa: E402
from shoplens.vision.detector import Detector  # noqa: E402
from shoplens.vision.embedding import Embedder  # noqa: E402

CLASSES = ("bed", "chair", "clock", "couch", "dining table", "plant_pot")
FRAME = (800, 500)


def cut_out(path: Path) -> tuple[Image.Image, Image.Image] | None:
    img = Image.open(path).convert("RGB")
    mask = product_mask(img)
    ys, xs = np.nonzero(mask)
    if len(xs) < 50:
        return None
    x1, x2, y1, y2 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    alpha = Image.fromarray((mask[y1:y2, x1:x2] * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
    return img.crop((x1, y1, x2, y2)), alpha


def paste(frame: Image.Image, product: tuple[Image.Image, Image.Image], half: int,
          rng: random.Random) -> list[int]:
    img, alpha = product
    if rng.random() < 0.5:
        img, alpha = ImageOps.mirror(img), ImageOps.mirror(alpha)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.85, 1.15))
    fw, fh = frame.size
    scale = min(0.45 * fw / img.width, 0.85 * fh / img.height) * rng.uniform(0.6, 1.0)
    size = (max(1, int(img.width * scale)), max(1, int(img.height * scale)))
    img, alpha = img.resize(size, Image.BILINEAR), alpha.resize(size, Image.BILINEAR)
    x0 = half * fw // 2 + rng.randrange(0, max(1, fw // 2 - size[0]))
    y0 = rng.randrange(0, max(1, fh - size[1]))
    frame.paste(img, (x0, y0), alpha)
    return [x0, y0, x0 + size[0], y0 + size[1]]


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class CachedEmbedder:
    """The embedder with a disk cache keyed by the sha256 of the image's pixels."""

    def __init__(self, inner: Embedder, path: Path):
        self.inner, self.backbone, self.path = inner, inner.backbone, path
        self.cache: dict[str, np.ndarray] = {}
        if path.is_file():
            with np.load(path) as z:
                self.cache = {k: z[k] for k in z.files}
        self.misses = 0

    @staticmethod
    def key(img: Image.Image) -> str:
        return hashlib.sha256(img.tobytes() + repr(img.size).encode()).hexdigest()

    def embed_decoded(self, decoded):
        keys = [self.key(img) for img in decoded]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            self.misses += len(todo)
            for i, v in zip(todo, self.inner.embed_decoded([decoded[i] for i in todo])):
                self.cache[keys[i]] = v
        return np.stack([self.cache[k] for k in keys]) if keys else np.zeros((0, 1), np.float32)

    def save(self):
        tmp = self.path.with_suffix(".tmp.npz")
        np.savez(tmp, **self.cache)
        os.replace(tmp, self.path)


def data_uri(img: Image.Image, side: int = 200) -> str:
    img = img.copy()
    img.thumbnail((side, side))
    return "data:image/jpeg;base64," + base64.b64encode(encode_jpeg(img, 80)).decode()


def demo_shop(args, settings, params, classes, detector, embedder, out: Path) -> dict:
    """The demo shop's photos (the replica's synthetic set, seed 0, as ``make demo`` serves it):
    every photo through the detector and the rules; each salvage candidate (rejected as multi-product, at most also occupancy) through
    the nightly's own ``salvage.salvage_photo`` with references = the product's kept photos."""
    from crawler.replica.synthetic import synthetic_sources

    sources = synthetic_sources(seed=0)
    decided: list[dict] = []
    for source in sources:
        for path in source.photos:
            data = path.read_bytes()
            f = features_for(detector, data)
            failed = sorted({d.rule for d in rules.decide(f, params) if not d.passed})
            decided.append({"product": source.key, "path": path, "failed": failed, "features": f})
    kept = {}
    for d in decided:
        if not d["failed"]:
            kept.setdefault(d["product"], []).append(d["path"])
    multi = [d for d in decided if salvage.salvageable(set(d["failed"]), settings)]
    salvaged, sheet = [], []
    for d in multi:
        refs_paths = kept.get(d["product"], [])[:settings.salvage_max_references]
        if not refs_paths:
            continue
        refs = embedder.embed_decoded([decode_photo(p.read_bytes()).image for p in refs_paths])
        f = d["features"]
        row = SimpleNamespace(width=f.width, height=f.height, boxes=f.boxes, category_id=None)
        image = decode_photo(d["path"].read_bytes()).image
        choice, box, rect, piece = salvage.salvage_photo(row, image, params, classes, embedder, refs,
                                                         settings.salvage_threshold, settings)
        if piece is not None:
            salvaged.append({"photo": str(d["path"]), "label": box["label"], "score": round(choice.best, 4),
                             "crop_box": list(rect)})
            boxed = image.copy()
            ImageDraw.Draw(boxed).rectangle(rect, outline=(255, 0, 0), width=5)
            sheet.append((boxed, piece, Image.open(refs_paths[0]).convert("RGB"),
                          f"{d['path'].parent.name}/{d['path'].name} {box['label']} {choice.best:.3f}"))
    write_sheet(sheet, out / "demo_sample.png")
    return {"products": len(sources), "photos": len(decided),
            "rejected": sum(1 for d in decided if d["failed"]),
            "rejected_multi_product": sum(1 for d in decided if "multi_product" in d["failed"]),
            "salvage_candidates": len(multi), "salvaged": len(salvaged),
            "salvaged_crops": salvaged}


def write_sheet(tiles_spec, path: Path, cols: int = 2) -> None:
    """A PNG contact sheet: per row the photo with the crop drawn, the crop, a reference, a caption."""
    tiles = []
    for boxed, crop_img, ref, caption in tiles_spec:
        tile = Image.new("RGB", (600, 220), "white")
        for i, img in enumerate((boxed, crop_img, ref)):
            img = img.copy()
            img.thumbnail((190, 190))
            tile.paste(img, (5 + 200 * i, 5))
        ImageDraw.Draw(tile).text((5, 200), caption, fill=(200, 0, 0) if "WRONG" in caption else (0, 0, 0))
        tiles.append(tile)
    if not tiles:
        return
    sheet = Image.new("RGB", (600 * cols, 220 * ((len(tiles) + cols - 1) // cols)), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, (600 * (i % cols), 220 * (i // cols)))
    sheet.save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", default=os.environ.get("SHOPLENS_SHARED_DIR", str(REPO.parent / "shared")))
    ap.add_argument("--photos", type=int, default=300)
    ap.add_argument("--sample", type=int, default=40, help="salvaged crops in the hand-check sample")
    ap.add_argument("--seed", type=int, default=17)
    ap.add_argument("--out", default=str(REPO / "results" / "salvage"))
    ap.add_argument("--demo", action="store_true",
                    help="also the demo shop's photos (the replica's synthetic set, seed 0)")
    args = ap.parse_args(argv)
    ikea = Path(args.shared) / "datasets" / "ikea" / "images"
    model = Path(args.shared) / "models" / "yolox_nano.onnx"
    if not ikea.is_dir() or not model.is_file():
        print(f"needs {ikea} and {model} (absent on this machine)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    settings = Settings()
    params = rules.params_from_settings(settings)
    classes = frozenset(settings.salvage_classes)
    detector = Detector(model)
    embedder = CachedEmbedder(Embedder(settings=settings), out / "embedding_cache.npz")
    rng = random.Random(args.seed)
    products = {c: sorted((ikea / c).glob("*.jpg")) for c in CLASSES}
    rooms = sorted((ikea / "room_scenes").glob("*.jpg"))
    records, sample_pool = [], []
    for n in range(args.photos):
        name = f"pasted-{n:04d}"
        c1, c2 = rng.sample(CLASSES, 2)
        p1, p2 = rng.choice(products[c1]), rng.choice(products[c2])
        present = rng.random() < 2 / 3
        reviewed = rng.choice([p1, p2]) if present else rng.choice(
            products[rng.choice([c for c in CLASSES if c not in (c1, c2)])])
        cut1, cut2 = cut_out(p1), cut_out(p2)
        if cut1 is None or cut2 is None:
            continue
        background = (room_background([r for r in rooms if split_of(r.name) == split_of(name)], rng)
                      if rng.random() < 0.5 else plain_background(rng))
        frame = background.resize(FRAME) if background.size != FRAME else background
        halves = [0, 1] if rng.random() < 0.5 else [1, 0]
        rects = {str(p1): paste(frame, cut1, halves[0], rng), str(p2): paste(frame, cut2, halves[1], rng)}
        data = encode_jpeg(frame, 90)
        f = features_for(detector, data)
        decisions = rules.decide(f, params)
        failed = {d.rule for d in decisions if not d.passed}
        record = {"name": name, "split": split_of(name), "classes": [c1, c2], "present": present,
                  "reviewed": str(reviewed.relative_to(ikea)), "verdict": sorted(failed)}
        if not salvage.salvageable(failed, settings):
            records.append(record)
            continue
        image = decode_photo(data).image
        refs = embedder.embed_decoded([Image.open(reviewed).convert("RGB")])
        boxes, group_of = salvage.salvage_boxes(f, params, classes)
        crops, crop_info = [], []
        for box, group in zip(boxes, group_of):
            piece, rect = crop(image, box["box"], settings.salvage_margin)
            if min(piece.size) < settings.salvage_min_side:
                continue
            overlaps = {k: iou(box["box"], r) for k, r in rects.items()}
            best_rect = max(overlaps, key=overlaps.get)
            right = present and best_rect == str(reviewed) and overlaps[best_rect] > 0.1
            crops.append(piece)
            crop_info.append({"label": box["label"], "group": group, "box": box["box"],
                              "rect": list(rect), "right": bool(right)})
        scores = (embedder.embed_decoded(crops) @ refs.T).max(axis=1) if crops else np.zeros(0)
        for info, s in zip(crop_info, scores):
            info["score"] = round(float(s), 4)
        record["crops"] = crop_info
        records.append(record)
        sample_pool.append((record, frame, reviewed))
        if n % 25 == 0:
            print(f"{n}/{args.photos} photos, {time.perf_counter() - started:.0f} s", flush=True)
    embedder.save()

    def outcome(record, threshold, gap):
        crops = record.get("crops") or []
        choice = salvage.choose([c["score"] for c in crops], [c["group"] for c in crops], threshold, gap)
        return choice, (crops[choice.index] if choice.index is not None else None)

    def evaluate(split, threshold, gap):
        chosen = [r for r in records if split == "all" or r["split"] == split]
        multi = [r for r in chosen if salvage.salvageable(set(r["verdict"]), settings)]
        salvaged = [(r, c) for r in multi for _, c in [outcome(r, threshold, gap)] if c is not None]
        right = sum(c["right"] for _, c in salvaged)
        present = [r for r in multi if r["present"]]
        return {"photos": len(chosen),
                "rejected_multi_product": sum(1 for r in chosen if "multi_product" in r["verdict"]),
                "salvage_candidates": len(multi),
                "rejected_other": sum(1 for r in chosen if r["verdict"] and "multi_product" not in r["verdict"]),
                "kept": sum(1 for r in chosen if not r["verdict"]),
                "salvaged": len(salvaged), "right": right,
                "precision": round(right / len(salvaged), 4) if salvaged else None,
                "salvaged_of_rejected": round(len(salvaged) / len(multi), 4) if multi else None,
                "salvaged_where_present": round(sum(c["right"] for r, c in salvaged if r["present"])
                                                / len(present), 4) if present else None,
                "salvaged_where_absent": sum(1 for r, _ in salvaged if not r["present"])}

    sweep = {split: [{"threshold": t, "gap": g, **evaluate(split, t, g)}
                     for t in (0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)
                     for g in (0.0, 0.02, 0.05, 0.1)] for split in ("tune", "report")}
    configured = {split: evaluate(split, settings.salvage_threshold, settings.salvage_min_gap)
                  for split in ("tune", "report", "all")}
    result = {"command": "benchmarks/salvage.py " + " ".join(argv or sys.argv[1:]),
              "embedding": f"untrained {embedder.backbone} (ImageNet)",
              "detector_version": detector.version, "rules_version": rules.RULES_VERSION,
              "threshold": settings.salvage_threshold, "min_gap": settings.salvage_min_gap,
              "margin": settings.salvage_margin, "configured": configured, "sweep": sweep,
              "wall_s": round(time.perf_counter() - started, 1), "load_average": os.getloadavg(),
              "embedded": embedder.misses}
    (out / "salvage.json").write_text(json.dumps(result, indent=1))
    (out / "records.json").write_text(json.dumps(records))

    # The hand-checkable sample: salvaged crops at the configured threshold, seeded choice.
    salvaged = [(r, frame, reviewed, c) for r, frame, reviewed in sample_pool
                for _, c in [outcome(r, settings.salvage_threshold, settings.salvage_min_gap)]
                if c is not None and r["split"] == "report"]
    sample = random.Random(args.seed).sample(salvaged, min(args.sample, len(salvaged)))
    cards, tiles = [], []
    for r, frame, reviewed, c in sample:
        boxed = frame.copy()
        ImageDraw.Draw(boxed).rectangle(c["rect"], outline=(255, 0, 0), width=5)
        crop_img = frame.crop(tuple(c["rect"]))
        ref = Image.open(reviewed).convert("RGB")
        verdict = "right" if c["right"] else "WRONG"
        cards.append(f'<figure><img src="{data_uri(boxed)}"><img src="{data_uri(crop_img)}">'
                     f'<img src="{data_uri(ref)}"><figcaption>{r["name"]}: {c["label"]}, '
                     f'similarity {c["score"]:.3f}; reviewed {r["reviewed"]} '
                     f'({"in view" if r["present"] else "not in view"}) - scored {verdict}'
                     f'</figcaption></figure>')
        tiles.append((boxed, crop_img, ref, f"{r['name']} {c['label']} {c['score']:.3f} {verdict}"))
    (out / "sample.html").write_text(
        "<!doctype html><meta charset=utf-8><title>salvage sample</title><style>figure{margin:8px}"
        "img{margin-right:6px;vertical-align:top}</style><h1>Salvaged crops: a sample of the report "
        f"half ({len(sample)} of {len(salvaged)})</h1><p>Each row: the photo with the salvaged crop in "
        "red, the crop, the reviewed product's catalogue image. Check by eye that the crop shows the "
        "catalogue product.</p>" + "".join(cards))
    write_sheet(tiles, out / "sample.png")
    if args.demo:
        result["demo_shop"] = demo_shop(args, settings, params, classes, detector, embedder, out)
        embedder.save()
        (out / "salvage.json").write_text(json.dumps(result, indent=1))
        print(json.dumps({k: v for k, v in result["demo_shop"].items() if k != "salvaged_crops"}))
    print(json.dumps({"configured": configured, "wall_s": result["wall_s"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

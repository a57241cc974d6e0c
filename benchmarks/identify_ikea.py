"""Benchmark (issue 17): detect-then-identify vs whole-image search on the IKEA room scenes.

    nice -n 10 .venv/bin/python benchmarks/identify_ikea.py [--shared ../shared] [--rooms DIR]
        [--out results/identify_ikea.json] [--work results/identify_ikea_work]
    # the recorded run (docs/benchmarks.md) spelled out; these are also the defaults:
    ... --backbones efficientnet_lite0 --margins 0.0,0.05,0.1,0.25 --min-scores 0.05,0.25 \
        --max-objects 8,8p2,12p4 --cost-photos 20

Protocol (the IKEA paper's): the gallery is the product photos of the category folders (bed,
chair, clock, couch, dining table, plant_pot -> COCO "potted plant"), one photo per product; the
queries are the room scenes with ground truth in ``metadata.json`` (``room_to_product_images``:
``images/chair/X.jpg``, ``images/table/X.jpg`` -> "dining table", ``images/sofa/X.jpg`` ->
"couch", ``images/bed``, ``images/plant_pot``; entries whose photo is not in a gallery folder are
left out). For each (room, class) with ground truth, that class's products are ranked by their
best score over the room's objects of that class; hit@k if any of the first k is in the room.
R@1/R@3/R@10 per class for:

- ``whole_image``: the whole room photo is the one query (no detection);
- ``detect``: detect-then-identify as ``modeling.identify`` does it (boxes of the configured
  classes >= min score, the best ``max_objects``, crop with margin, embed); a (room, class) with no
  object of that class detected is a miss;
- ``detect_or_whole``: the same, with the whole image standing in when no object of that class
  was detected (what a caller gets by also reading the whole-image answer).

Rooms are split into "tune" and "report" halves by a hash of the file name (as
benchmarks/filter_ikea.py does); every variant (backbone, crop margin, gallery trimming, flip
TTA, detector threshold, object cap) is scored on both, the one chosen is the best on "tune" by
mean R@10 of chair, couch and dining table (ties: mean R@1), and the numbers to quote are its
"report" and "all" rows. ``production_check`` reruns the chosen variant through
``modeling.identify.identify`` itself (gallery indexed from a listing CSV, as the CLI does).

Cost: per room photo on one core (child process pinned to one CPU, one thread): ``identify``
(decode, detect, crops, embed, search) vs one whole-photo search query (decode, embed, search),
medians and their ratio.

Detections and embeddings are cached under ``--work`` (keyed by backbone, crop margin, mirror),
so a rerun only computes what is new.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shoplens.config import Settings  # noqa: E402

SHARED = Path(os.environ.get("SHOPLENS_SHARED_DIR", REPO.parent / "shared"))
FOLDERS = {"bed": "bed", "chair": "chair", "clock": "clock", "couch": "couch",
           "dining table": "dining table", "plant_pot": "potted plant"}
GT_FOLDER = {"chair": "chair", "table": "dining table", "sofa": "couch", "couch": "couch",
             "bed": "bed", "plant_pot": "plant_pot", "clock": "clock", "dining table": "dining table"}
PAPER = {"chair": {"R@1": 0.239, "R@10": 0.664}, "couch": {"R@10": 0.417},
         "dining table": {"R@10": 0.432}}
TARGETS = {"chair": {"R@10": 0.80, "R@1": 0.478}, "couch": {"R@10": 0.50},
           "dining table": {"R@10": 0.52}, "cost_ratio": 2.0}
KS = (1, 3, 10)
DETECT_FLOOR = 0.05  # boxes cached down to this score; variants threshold above it
CACHE_OBJECTS = 24   # boxes of the cached classes kept per room


def split_of(name: str) -> str:
    return "tune" if int(hashlib.sha256(name.encode()).hexdigest(), 16) % 2 == 0 else "report"


def tune_room_photos(rooms_dir: Path) -> list[Path]:
    """Every room photo of the "tune" half (with ground truth or not): what a head trained for
    this benchmark may paste products onto; the "report" rooms stay unseen."""
    return sorted(p for p in rooms_dir.iterdir()
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png") and split_of(p.name) == "tune")


# --- data -------------------------------------------------------------------------------------
def read_gallery(ikea: Path) -> list[dict]:
    out = []
    for folder, cls in FOLDERS.items():
        for f in sorted((ikea / "images" / folder).glob("*.jpg")):
            out.append({"path": str(f), "product_id": f.stem, "class": cls, "folder": folder})
    return out


def read_rooms(ikea: Path, rooms_dir: Path, gallery: list[dict]) -> list[dict]:
    """Rooms of ``rooms_dir`` that have ground truth in the gallery: {name, path, truth{cls: set}}."""
    meta = json.loads((ikea / "metadata.json").read_text())["room_to_product_images"]
    in_gallery = {(g["folder"], g["product_id"]) for g in gallery}
    cls_of = {g["folder"]: g["class"] for g in gallery}
    rooms = []
    for name in sorted(meta):
        path = rooms_dir / name
        if not path.is_file():
            continue
        truth: dict[str, set] = {}
        for entry in meta[name]:
            parts = entry.split("/")
            if len(parts) != 3 or parts[1] not in GT_FOLDER:
                continue
            folder, pid = GT_FOLDER[parts[1]], Path(parts[2]).stem
            if (folder, pid) in in_gallery:
                truth.setdefault(cls_of[folder], set()).add(pid)
        if truth:
            rooms.append({"name": name, "path": str(path), "truth": truth, "split": split_of(name)})
    return rooms


# --- cached computations -----------------------------------------------------------------------
class Cache:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def vectors(self, name: str, keys: list[str], compute) -> dict[str, np.ndarray]:
        """{key: vector}, computing (``compute(missing keys) -> array``) only what is missing."""
        path = self.root / f"{name}.npz"
        have = {}
        if path.is_file():
            with np.load(path) as z:
                have = dict(zip(z["keys"].tolist(), z["vectors"]))
        missing = [k for k in keys if k not in have]
        if missing:
            t0 = time.time()
            vecs = compute(missing)
            have.update(zip(missing, vecs))
            all_keys = sorted(have)
            np.savez(path.with_suffix(".tmp.npz"), keys=np.array(all_keys),
                     vectors=np.stack([have[k] for k in all_keys]))
            os.replace(path.with_suffix(".tmp.npz"), path)
            print(f"  {name}: embedded {len(missing)} in {time.time() - t0:.0f} s", flush=True)
        return {k: have[k] for k in keys}


def detections(cache: Cache, rooms: list[dict], model: str, settings: Settings) -> dict:
    """Room name -> boxes ([x0, y0, x1, y1, label, score], best first) of the configured classes."""
    from PIL import Image

    from modeling.identify import detect_objects
    from shoplens.vision.detector import Detector, model_version

    path = cache.root / "detections.json"
    version = model_version(model)
    have = json.loads(path.read_text()) if path.is_file() else {}
    if have.get("version") != version:
        have = {"version": version, "rooms": {}}
    todo = [r for r in rooms if r["name"] not in have["rooms"]]
    if todo:
        det = Detector(model, min_score=DETECT_FLOOR)
        s = settings.with_overrides(identify_min_score=DETECT_FLOOR,
                                    identify_max_objects=CACHE_OBJECTS)
        t0 = time.time()
        for r in todo:
            img = Image.open(r["path"]).convert("RGB")
            have["rooms"][r["name"]] = [[*map(float, o.box), o.label, o.score]
                                        for o in detect_objects(img, det, s)]
        path.write_text(json.dumps(have))
        print(f"  detections: {len(todo)} rooms in {time.time() - t0:.0f} s", flush=True)
    return have["rooms"]


def parse_backbone(spec: str) -> dict:
    """``NAME[@SIZE][:gem|:roiSIZE]`` -> the identify settings it stands for: ``@128`` embeds
    crops and gallery at 128 px; ``:roi448`` pools each box from one 448 px pass over the photo
    (``identify_pooling = "roi"``); ``:gem`` GeM-pools the crops (benchmark only)."""
    head, _, pooling = spec.partition(":")
    if head.startswith("head="):  # an embedding directory with a trained head
        from shoplens.vision.embedding import Embedder

        root = head[len("head="):]
        e = Embedder.load(root)
        out = {"identify_backbone": e.backbone, "identify_image_size": e.image_size,
               "identify_embedding": root}
        if pooling.startswith("roi"):
            out.update(identify_pooling="roi", identify_roi_size=int(pooling[3:] or 448))
        return out
    name, _, size = head.partition("@")
    if size.endswith("g"):  # "@160g": crops at 160 px, the gallery at the backbone's own size
        out = {"identify_backbone": name, "identify_image_size": 0,
               "identify_crop_size": int(size[:-1])}
    else:
        out = {"identify_backbone": name, "identify_image_size": int(size or 0)}
    if pooling.startswith("roi"):
        out.update(identify_pooling="roi", identify_roi_size=int(pooling[3:] or 448))
    return out


def embedder_for(backbone: str, _cache={}):
    from shoplens.vision.embedding import Embedder

    if backbone not in _cache:
        p = parse_backbone(backbone)
        _cache[backbone] = Embedder.load(p["identify_embedding"]) \
            if p.get("identify_embedding") else \
            Embedder(p["identify_backbone"], p.get("identify_crop_size") or p["identify_image_size"])
    return _cache[backbone]


def _embed(backbone: str, photos: list) -> np.ndarray:
    """``name:gem``: generalised-mean pooling (p = 3) of the last feature map instead of the mean."""
    base, _, pooling = backbone.partition(":")
    embedder = embedder_for(base)
    if not pooling or pooling.startswith("roi"):
        return embedder.embed_decoded(photos)
    import keras

    if not hasattr(embedder, "_gem_model"):
        m = embedder.model
        embedder._gem_model = keras.Model(m.input, m.get_layer("avg_pool").input)
    crops = embedder.centre_crops(embedder.squares(photos)).astype(np.float32)
    maps = np.concatenate([np.asarray(embedder._gem_model.predict_on_batch(crops[i:i + 32]))
                           for i in range(0, len(crops), 32)])
    pooled = np.mean(np.clip(maps, 1e-6, None) ** 3, axis=(1, 2)) ** (1 / 3)
    return unit(pooled.astype(np.float32))


def gallery_vectors(cache: Cache, gallery: list[dict], backbone: str, trim: bool, mirror: bool):
    from PIL import Image, ImageOps

    from shoplens.vision.crops import trimmed_to_product

    def compute(keys):
        out = []
        for start in range(0, len(keys), 32):
            imgs = [Image.open(k).convert("RGB") for k in keys[start:start + 32]]
            imgs = [trimmed_to_product(i) if trim else i for i in imgs]
            imgs = [ImageOps.mirror(i) if mirror else i for i in imgs]
            out.append(_embed(backbone, imgs))
        return np.concatenate(out)

    if ":roi" in backbone:  # the gallery is embedded as usual; only the rooms differ
        backbone = backbone.partition(":")[0]
    if backbone.partition(":")[0].endswith("g") and "@" in backbone:  # "@160g": native gallery
        backbone = backbone.partition("@")[0]
    backbone_tag = backbone.replace("/", "_")
    name = f"gallery-{backbone_tag}-{'trim' if trim else 'raw'}{'-mirror' if mirror else ''}"
    got = cache.vectors(name, [g["path"] for g in gallery], compute)
    return np.stack([got[g["path"]] for g in gallery])


def parse_room_views(spec: str) -> tuple[int, float]:
    """"8:2" -> 8 room views per gallery photo, its own vector weighted 2; "0" -> off."""
    views, _, weight = spec.partition(":")
    return int(views), float(weight or Settings.identify_gallery_clean_weight)


def gallery_room_vectors(cache: Cache, gallery: list[dict], backbone: str, clean: np.ndarray,
                         spec: str, backgrounds: list[Path]) -> np.ndarray:
    """The trimmed gallery's vectors with room views on the tune half's rooms (as identify's
    ``identify_gallery_backgrounds`` makes them: :func:`modeling.identify.room_view_means`,
    cached per view count, so weights cost nothing more)."""
    from modeling.identify import _photo_seed, room_view_means, with_room_views
    from shoplens.vision import images
    from shoplens.vision.room_views import load_backgrounds

    views, weight = parse_room_views(spec)
    if ":" in backbone or "head=" in backbone:
        raise SystemExit("error: --gallery-room-views takes plain backbones only")
    rooms = []

    def compute(keys):
        if not rooms:
            rooms.extend(load_backgrounds(backgrounds))
        out = []
        for start in range(0, len(keys), 32):
            part = keys[start:start + 32]
            data = [images.read_file(k) for k in part]
            out.append(room_view_means(embedder_for(backbone),
                                       [images.decode(d, k) for d, k in zip(data, part)],
                                       [_photo_seed(d) for d in data], rooms, views))
        return np.concatenate(out)

    name = f"gallery-{backbone.replace('/', '_')}-trim-roomviews{views}"
    got = cache.vectors(name, [g["path"] for g in gallery], compute)
    return with_room_views(clean, np.stack([got[g["path"]] for g in gallery]), weight)


NEEDED = {"min_score": DETECT_FLOOR, "max_objects": CACHE_OBJECTS, "classes": set()}


def needed(bx, room) -> list[int]:
    return [i for i in objects_of(bx, NEEDED["min_score"], NEEDED["max_objects"], NEEDED["classes"])
            if bx[i][4] in room["truth"]]


def room_vectors(cache: Cache, rooms: list[dict], boxes: dict, backbone: str, margin: float | None,
                 mirror: bool) -> dict:
    """Crop (or, margin None, whole-photo) embeddings keyed 'room|i' (i = box index; 'room|-1')."""
    from PIL import Image, ImageOps

    from shoplens.vision.crops import square_crop

    keys = []
    for r in rooms:
        # Only boxes some variant keeps and that are of a class with ground truth are ever used.
        keys += [f"{r['name']}|-1"] if margin is None else \
            [f"{r['name']}|{i}" for i in needed(boxes[r["name"]], r)]
    paths = {r["name"]: r["path"] for r in rooms}

    def compute(missing):
        out, by_room = [], {}
        for k in missing:
            name, i = k.rsplit("|", 1)
            by_room.setdefault(name, []).append(int(i))
        order = []
        crops = []
        roi = parse_backbone(backbone).get("identify_roi_size")
        for name, idx in by_room.items():
            img = Image.open(paths[name]).convert("RGB")
            if roi and margin is not None:  # one pass over the photo, each box pooled from it
                from modeling.identify import roi_features

                if mirror:
                    raise SystemExit("error: :roi backbones take no mirror TTA (--flips 0)")
                e = embedder_for(backbone.partition(":")[0])
                out.append(e.project(roi_features(e, img, [boxes[name][i][:4] for i in idx],
                                                  roi)))
                order += [f"{name}|{i}" for i in idx]
                continue
            for i in idx:
                crop = img if i < 0 else square_crop(img, boxes[name][i][:4], margin)
                crops.append(ImageOps.mirror(crop) if mirror else crop)
                order.append(f"{name}|{i}")
            if len(crops) >= 32:
                out.append(_embed(backbone, crops))
                crops = []
        if crops:
            out.append(_embed(backbone, crops))
        vecs = dict(zip(order, np.concatenate(out)))
        return np.stack([vecs[k] for k in missing])

    tag = "whole" if margin is None else f"crops-m{margin:.2f}"
    name = f"rooms-{backbone.replace('/', '_')}-{tag}{'-mirror' if mirror else ''}"
    return cache.vectors(name, keys, compute)


def colour_histogram(img, backdrop: bool) -> np.ndarray:
    """sqrt of the normalised 8x8x8 RGB histogram (unit length: dot products are Bhattacharyya
    coefficients); ``backdrop``: only the pixels that are not white studio backdrop."""
    px = np.asarray(img.convert("RGB").resize((96, 96))).reshape(-1, 3)
    if backdrop:
        product = px.min(axis=1) < 240
        if product.sum() >= 50:
            px = px[product]
    bins = (px // 32).astype(np.int64)
    hist = np.bincount(bins[:, 0] * 64 + bins[:, 1] * 8 + bins[:, 2], minlength=512)
    return np.sqrt(hist / max(1, hist.sum())).astype(np.float32)


def colours(cache: Cache, gallery, rooms, boxes):
    from PIL import Image

    g = cache.vectors("colour-gallery", [x["path"] for x in gallery],
                      lambda keys: np.stack([colour_histogram(Image.open(k), True) for k in keys]))
    keys = [f"{r['name']}|{i}" for r in rooms for i in [-1, *needed(boxes[r["name"]], r)]]
    paths = {r["name"]: r["path"] for r in rooms}

    def compute(missing):
        out, opened = [], {}
        for k in missing:
            name, i = k.rsplit("|", 1)
            if name not in opened:
                opened = {name: Image.open(paths[name]).convert("RGB")}
            img = opened[name]
            out.append(colour_histogram(img if int(i) < 0 else img.crop(
                tuple(int(v) for v in boxes[name][int(i)][:4])), False))
        return np.stack(out)

    return np.stack([g[x["path"]] for x in gallery]), cache.vectors("colour-rooms", keys, compute)


# --- scoring ----------------------------------------------------------------------------------
def unit(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_hubness(gvec: np.ndarray, gallery: list[dict], k: int,
                  proxies: dict[str, np.ndarray] | None = None) -> np.ndarray:
    """(G,) each gallery product's hubness within its class: the mean similarity of its vector
    to the ``k`` nearest stand-ins for queries of that class. ``proxies`` None: the class's
    *other* gallery photos; else {class: (n, d) vectors}, e.g. crops of that class from rooms
    that are never scored (the tune half). A product near everything of its class (a plain
    grey sofa) wins rooms it is not in; CSLS subtracts this term."""
    cls_arr = np.array([g["class"] for g in gallery])
    out = np.zeros(len(gallery))
    for c in set(cls_arr):
        members = np.flatnonzero(cls_arr == c)
        if proxies is None:
            sims = gvec[members] @ gvec[members].T
            np.fill_diagonal(sims, -np.inf)
        elif c in proxies and len(proxies[c]):
            sims = gvec[members] @ proxies[c].T
        else:
            continue
        kk = min(k, sims.shape[1] - (1 if proxies is None else 0))
        if kk > 0:
            out[members] = np.partition(sims, -kk, axis=1)[:, -kk:].mean(1)
    return out


def parse_hubness(spec: str) -> tuple[str, int, float] | None:
    """"0" -> None; "gallery:10:0.5" / "rooms:10:0.5" -> (source, k, beta)."""
    if spec in ("", "0"):
        return None
    source, k, beta = spec.split(":")
    if source not in ("gallery", "rooms"):
        raise SystemExit(f"error: hubness source {source!r}: gallery or rooms")
    return source, int(k), float(beta)


def recall_table(rooms, gallery, gvec, query_sets, gbias=None) -> dict:
    """query_sets(room, cls) -> ((n, d) query vectors (may be empty: a miss), (n,) score offsets).
    ``gbias``: (G,) added to each gallery product's score (a hubness correction). R@k per class
    and split, and the per-class pair counts."""
    classes = sorted({c for r in rooms for c in r["truth"]})
    ids = np.array([g["product_id"] for g in gallery])
    cls_arr = np.array([g["class"] for g in gallery])
    result = {}
    for split in ("tune", "report", "all"):
        per = {}
        for c in classes:
            members = np.flatnonzero(cls_arr == c)
            hits = {k: 0 for k in KS}
            n = 0
            for r in rooms:
                if c not in r["truth"] or (split != "all" and r["split"] != split):
                    continue
                n += 1
                q, offsets = query_sets(r, c)
                if len(q) == 0:
                    continue
                best = (gvec[members] @ q.T + offsets[None, :]).max(axis=1)
                if gbias is not None:
                    best = best + gbias[members]
                ranked = ids[members][np.argsort(-best, kind="stable")]
                for k in KS:
                    hits[k] += bool(set(ranked[:k]) & r["truth"][c])
            per[c] = {"pairs": n, **{f"R@{k}": round(hits[k] / n, 3) if n else None for k in KS}}
        result[split] = per
    return result


def chosen_key(table: dict) -> tuple:
    t = table["tune"]
    main = ("chair", "couch", "dining table")
    return (np.mean([t[c]["R@10"] or 0 for c in main]), np.mean([t[c]["R@1"] or 0 for c in main]))


def parse_cap(cap) -> tuple[int, int]:
    """(overall cap, per-class cap or 0): "8" -> (8, 0), "8p2" -> (8, 2), "p2" -> (all, 2)."""
    cap = str(cap)
    if "p" in cap:
        overall, per = cap.split("p")
        return int(overall) if overall else CACHE_OBJECTS, int(per)
    return int(cap), 0


def objects_of(boxes, min_score: float, max_objects, classes: set):
    """Indices of the boxes identify keeps (configured classes, score, per-class and overall
    caps as :func:`parse_cap` reads ``max_objects``), best first."""
    overall, per = parse_cap(max_objects)
    kept = [i for i, b in enumerate(boxes) if b[4] in classes and b[5] >= min_score]
    if per:
        seen: dict[str, int] = {}
        out = []
        for i in kept:
            seen[boxes[i][4]] = seen.get(boxes[i][4], 0) + 1
            if seen[boxes[i][4]] <= per:
                out.append(i)
        kept = out
    return kept[:overall]


# --- the production path and the cost -----------------------------------------------------------
def write_listing(gallery: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "product_id", "class"])
        for g in gallery:
            w.writerow([str(Path(g["path"]).resolve()), g["product_id"], g["class"]])
    return path


def production_check(rooms, gallery, listing: Path, work: Path, settings: Settings, model: str):
    """R@k of the chosen variant through modeling.identify.identify (all products returned),
    the photo decoded and the detector chosen as identify's settings say."""
    from modeling.identify import Gallery, decode_for_identify, identify, identify_detector

    g = Gallery.from_listing(listing, settings, cache_dir=work / "galleries")
    det = identify_detector(settings.with_overrides(detector_model_path=model), threads=0)
    ids = [x["product_id"] for x in gallery]
    cls_of: dict[str, set] = {}
    for x in gallery:  # a sofa bed is in the bed and the couch folders
        cls_of.setdefault(x["product_id"], set()).add(x["class"])
    outputs = {}
    for r in rooms:
        photo = decode_for_identify(Path(r["path"]).read_bytes(), settings)
        outputs[r["name"]] = identify(photo.image, g, det, settings, k=len(ids),
                                      full_size=(photo.width, photo.height))
    table = {}
    for split in ("tune", "report", "all"):
        per = {}
        for c in sorted({c for r in rooms for c in r["truth"]}):
            hits, n = {k: 0 for k in KS}, 0
            for r in rooms:
                if c not in r["truth"] or (split != "all" and r["split"] != split):
                    continue
                n += 1
                best: dict[str, float] = {}
                for o in outputs[r["name"]]:
                    if o["class"] != c:
                        continue
                    for t in o["top"]:
                        if c in cls_of[t["product_id"]]:
                            best[t["product_id"]] = max(best.get(t["product_id"], -9), t["score"])
                ranked = [p for p, _ in sorted(best.items(), key=lambda kv: -kv[1])]
                for k in KS:
                    hits[k] += bool(set(ranked[:k]) & r["truth"][c])
            per[c] = {"pairs": n, **{f"R@{k}": round(hits[k] / n, 3) if n else None for k in KS}}
        table[split] = per
    return table


def cost_child(listing: str, work: str, variants_json: str, model: str, paths: list[str],
               warmup: int = 2) -> None:
    """In a child pinned to one core: per photo, identify under each variant vs one whole-photo
    search query of the same photo, interleaved so every variant sees the same load."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from modeling.identify import Gallery, decode_for_identify, identify, identify_detector
    from shoplens.vision import images
    from shoplens.vision.embedding import NETWORK_CACHE, Embedder

    variants = json.loads(variants_json)
    runs = []
    for v in variants:
        settings = Settings().with_overrides(**v["overrides"])
        g = Gallery.from_listing(listing, settings, cache_dir=Path(work) / "galleries")
        runs.append((v, settings, g))
    settings0, g0 = runs[0][1], runs[0][2]
    # One detector per model file (a variant may run an int8 copy), at the lowest min score.
    min_score = min(r[1].identify_min_score for r in runs)
    detectors = {}
    for _, settings, _ in runs:
        path = settings.identify_detector_model_path or model
        if path not in detectors:
            detectors[path] = identify_detector(settings.with_overrides(
                identify_detector_model_path=path, identify_min_score=min_score), threads=1)
    # The baseline is the shop's search query: one photo at the backbone's native size, whatever
    # size identify embeds its crops at, on the frozen network as the search service runs it
    # (the galleries' crops run theirs too).
    query = Embedder(settings0.identify_backbone, settings=settings0).cache_network(
        Path(work) / "galleries" / NETWORK_CACHE)
    searchable = Gallery.searchable
    times = {v["name"]: [] for v, _, _ in runs}
    objects = {v["name"]: [] for v, _, _ in runs}
    search = []
    for i, p in enumerate(paths):
        for v, settings, g in runs:
            # "all_classes": boxes of classes the gallery has no product of are kept (as before).
            Gallery.searchable = (lambda self: None) if v.get("all_classes") else searchable
            t0 = time.perf_counter()
            photo = decode_for_identify(images.read_file(p), settings)
            out = identify(photo.image, g, detectors[settings.identify_detector_model_path or model],
                           settings, full_size=(photo.width, photo.height))
            t1 = time.perf_counter()
            if i >= warmup:
                times[v["name"]].append((t1 - t0) * 1000)
                objects[v["name"]].append(len(out))
        Gallery.searchable = searchable
        t1 = time.perf_counter()
        img = images.decode(images.read_file(p), p)
        vector = query.embed_decoded([img])[0]
        if query.dim == g0.embedder.dim:
            g0.index.answer(vector, settings0.identify_top)
        t2 = time.perf_counter()
        if i >= warmup:
            search.append((t2 - t1) * 1000)
    s50 = float(np.median(search))
    print(json.dumps({"photos": len(search), "search_ms_p50": round(s50, 1), "variants": {
        name: {"identify_ms_p50": round(float(np.median(t)), 1),
               "ratio_p50": round(float(np.median(t)) / s50, 2),
               "objects_mean": round(float(np.mean(objects[name])), 2)}
        for name, t in times.items()}}))


def measure_cost(listing: Path, work: Path, variants: list[dict], model: str,
                 paths: list[str]) -> dict:
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    load_before = [round(x, 2) for x in os.getloadavg()]
    proc = subprocess.run([sys.executable, __file__, "--cost-child", str(listing), str(work),
                           json.dumps(variants), model, *paths],
                          env=env, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "cores": 1,
            "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


# --- main -------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--rooms", type=Path, help="folder of room photos (default: the IKEA room_scenes)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "identify_ikea.json")
    ap.add_argument("--work", type=Path, default=REPO / "results" / "identify_ikea_work")
    ap.add_argument("--backbones", default="efficientnet_lite0",
                    help='comma-separated; "NAME:gem" pools the last feature map by GeM (p = 3); '
                         '"NAME@128" embeds at 128 px; "NAME:roi448" pools each box from one '
                         '448 px pass over the photo')
    ap.add_argument("--margins", default="0.0,0.05,0.1,0.25",
                    help='crop margins; "a+b" averages the embeddings of both crops')
    ap.add_argument("--min-scores", default="0.05,0.25")
    ap.add_argument("--max-objects", default="8,8p2,12p4",
                    help='object caps: "N" the N best, "NpM" the M best of each class and of '
                         'those the N best')
    ap.add_argument("--det-weights", default="0,0.2",
                    help="weights of the detector score added to an object's similarities")
    ap.add_argument("--colour-weights", default="0",
                    help="weights of the colour histograms' similarity added to the embedding's")
    ap.add_argument("--trims", default="0,1", help="gallery trimming off/on (0,1)")
    ap.add_argument("--flips", default="0,1", help="mirror TTA off/on (0,1)")
    ap.add_argument("--gallery-room-views", default="0",
                    help='comma-separated "VIEWS:WEIGHT" (0 = off): the trimmed gallery also seen '
                         'on patches of the tune half\'s rooms (identify_gallery_backgrounds); '
                         'the held-out rooms are never read')
    ap.add_argument("--hubness", default="0",
                    help='comma-separated "SOURCE:K:BETA" (0 = off): scores less BETA x each '
                         'product\'s mean similarity to its K nearest stand-in queries of its '
                         'class, SOURCE "gallery" (its class\'s other products) or "rooms" (the '
                         'tune half\'s crops of the class: tune numbers see their own rooms, the '
                         'held-out half does not)')
    ap.add_argument("--all-classes", action="store_true",
                    help="let boxes of classes the gallery has no product of take places under "
                         "the object caps (identify before it skipped them)")
    ap.add_argument("--fallback-classes", default="",
                    help="comma-separated identify_fallback_classes for the production check and "
                         "the cost (the whole photo for such a class with no box)")
    ap.add_argument("--fallback-embedding", default="",
                    help="identify_fallback_embedding (e.g. a head from modeling.identify_head)")
    ap.add_argument("--no-production-check", action="store_true")
    ap.add_argument("--production-variant", action="append", default=[],
                    help='NAME=JSON: also run the production check with these settings over the '
                         'chosen ones (e.g. identify_decode_side, identify_detector_model_path)')
    ap.add_argument("--cost-photos", type=int, default=20, help="room photos timed (0: skip)")
    ap.add_argument("--cost-variant", action="append", default=[],
                    help='NAME=JSON: also time identify with these settings over the chosen ones')
    ap.add_argument("--write-tune-rooms", type=Path, metavar="PATH",
                    help="only write the tune half's room photos, one a line (backgrounds for "
                         "modeling.identify_head --backgrounds), and exit")
    ap.add_argument("--cost-child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_tune_rooms:
        tune = tune_room_photos(args.rooms or args.shared / "datasets" / "ikea" / "images" / "room_scenes")
        args.write_tune_rooms.write_text("".join(f"{p}\n" for p in tune))
        print(f"wrote {len(tune)} tune-half room photos to {args.write_tune_rooms}")
        return 0
    if args.cost_child:
        cost_child(args.cost_child[0], args.cost_child[1], args.cost_child[2], args.cost_child[3],
                   args.cost_child[4:])
        return 0
    t_start = time.time()
    ikea = args.shared / "datasets" / "ikea"
    model = str(args.shared / "models" / "yolox_nano.onnx")
    settings = Settings()
    gallery = read_gallery(ikea)
    rooms = read_rooms(ikea, args.rooms or ikea / "images" / "room_scenes", gallery)
    if not rooms:
        print("error: no room with ground truth found", file=sys.stderr)
        return 2
    print(f"gallery {len(gallery)} photos, {len(rooms)} rooms with ground truth", flush=True)
    cache = Cache(args.work)
    backbones = args.backbones.split(",")
    margins = args.margins.split(",")
    min_scores = [float(s) for s in args.min_scores.split(",")]
    caps = args.max_objects.split(",")
    lams = [float(x) for x in args.det_weights.split(",")]
    colour_weights = [float(x) for x in args.colour_weights.split(",")]
    trims = [bool(int(t)) for t in args.trims.split(",")]
    flips = [bool(int(f)) for f in args.flips.split(",")]
    room_views = args.gallery_room_views.split(",")
    hubs = [parse_hubness(h) for h in args.hubness.split(",")]
    tune_rooms = tune_room_photos(args.rooms or ikea / "images" / "room_scenes")
    boxes = detections(cache, rooms, model, settings)
    classes = set(settings.identify_classes)
    if not args.all_classes:  # as identify does: only classes the gallery has products of
        classes &= set(FOLDERS.values())
    NEEDED.update(min_score=min(min_scores), classes=classes)
    gcol, rcol = colours(cache, gallery, rooms, boxes)

    variants = []
    for backbone in backbones:
        g = {(t, m): gallery_vectors(cache, gallery, backbone, t, m)
             for t in trims for m in {False, *flips}}
        whole = {m: room_vectors(cache, rooms, boxes, backbone, None, m) for m in {False, *flips}}
        for trim, flip, cw, rv in itertools.product(trims, flips, colour_weights, room_views):
            if parse_room_views(rv)[0] and (flip or not trim):
                continue  # room views are made of the trimmed studio photo, without mirroring
            # Colour: the histograms' similarity, weighted cw, added to the embedding's.
            gvec = unit(g[(trim, False)] + g[(trim, True)]) if flip else g[(trim, False)]
            if parse_room_views(rv)[0]:
                gvec = gallery_room_vectors(cache, gallery, backbone, gvec, rv, tune_rooms)
            gvec = np.concatenate([gvec, np.sqrt(cw) * gcol], axis=1)

            def whole_q(r, c, flip=flip, cw=cw):
                v = whole[False][f"{r['name']}|-1"]
                v = unit(v + whole[True][f"{r['name']}|-1"])[None] if flip else v[None]
                v = np.concatenate([v, np.sqrt(cw) * rcol[f"{r['name']}|-1"][None]], axis=1)
                return v, np.zeros(1)

            variants.append({"mode": "whole_image", "backbone": backbone, "trim": trim,
                             "flip": flip, "colour_weight": cw, "gallery_room_views": rv,
                             "table": recall_table(rooms, gallery, gvec, whole_q)})
            for margin in margins:
                parts = [float(m) for m in margin.split("+")]  # "0.1+0.25": mean of both crops
                crops = {(p, m): room_vectors(cache, rooms, boxes, backbone, p, m)
                         for p in parts for m in ((False, True) if flip else (False,))}
                for min_score, cap, lam, fallback, hub in itertools.product(
                        min_scores, caps, lams, (False, True), hubs):
                    def detect_q(r, c, parts=parts, min_score=min_score, cap=cap, lam=lam,
                                 fallback=fallback, flip=flip, crops=crops, cw=cw,
                                 whole_q=whole_q):
                        bx = boxes[r["name"]]
                        kept = [i for i in objects_of(bx, min_score, cap, classes)
                                if bx[i][4] == c]
                        if not kept:
                            return whole_q(r, c) if fallback else (np.zeros((0, 1)), None)
                        v = unit(np.stack([sum(crops[(p, m)][f"{r['name']}|{i}"]
                                               for p in parts
                                               for m in ((False, True) if flip else (False,)))
                                           for i in kept]))
                        v = np.concatenate([v, np.sqrt(cw) * np.stack(
                            [rcol[f"{r['name']}|{i}"] for i in kept])], axis=1)
                        return v, lam * np.array([bx[i][5] for i in kept])

                    gbias = None
                    if hub is not None:
                        source, k, beta = hub
                        proxies = None
                        if source == "rooms":
                            proxies = {}
                            for r in rooms:  # crops exist for the classes of its truth
                                for c in r["truth"] if r["split"] == "tune" else ():
                                    q, _ = detect_q(r, c)
                                    if len(q):  # the queries this variant would ask
                                        proxies.setdefault(c, []).append(q)
                            proxies = {c: np.concatenate(v) for c, v in proxies.items()}
                        gbias = -beta * class_hubness(gvec, gallery, k, proxies)
                    variants.append({
                        "mode": "detect_or_whole" if fallback else "detect",
                        "backbone": backbone, "trim": trim, "flip": flip, "margin": margin,
                        "min_score": min_score, "max_objects": cap, "det_weight": lam,
                        "colour_weight": cw, "gallery_room_views": rv,
                        "hubness": list(hub) if hub else None,
                        "objects_per_photo": round(float(np.mean(
                            [len(objects_of(boxes[r["name"]], min_score, cap, classes))
                             for r in rooms])), 2),
                        "table": recall_table(rooms, gallery, gvec, detect_q, gbias)})
    # Chosen among what modeling.identify does (one crop margin, ranking by similarity alone);
    # the best of every variant tried is reported beside it ("best_tried").
    def runnable(v):
        return ("+" not in str(v.get("margin", "")) and not v.get("det_weight")
                and not v.get("colour_weight") and not v.get("hubness"))

    best = {mode: max((v for v in variants if v["mode"] == mode and runnable(v)),
                      key=lambda v: chosen_key(v["table"]))
            for mode in ("whole_image", "detect", "detect_or_whole")}
    best_tried = max((v for v in variants if v["mode"] == "detect"),
                     key=lambda v: chosen_key(v["table"]))
    # The same embedding as the chosen detect variant, without detection: the fair baseline.
    d = best["detect"]
    same = next(v for v in variants if v["mode"] == "whole_image" and v["backbone"] == d["backbone"]
                and v["trim"] == d["trim"] and v["flip"] == d["flip"]
                and v["colour_weight"] == d["colour_weight"]
                and v["gallery_room_views"] == d["gallery_room_views"])
    result = {"gallery_photos": len(gallery), "rooms": len(rooms),
              "rooms_by_split": {s: sum(r["split"] == s for r in rooms) for s in ("tune", "report")},
              "rooms_dir": str(args.rooms or "images/room_scenes"),
              "paper": PAPER, "targets": TARGETS,
              "chosen": {m: {k: v for k, v in best[m].items()} for m in best},
              "whole_image_same_embedding": same, "best_tried": best_tried,
              "variants": [{k: v for k, v in x.items()} for x in variants]}
    overall, per = parse_cap(d["max_objects"])
    overrides = {**parse_backbone(d["backbone"]), "identify_margin": float(d["margin"]),
                 "identify_min_score": d["min_score"], "identify_max_objects": overall,
                 "identify_max_per_class": per, "identify_trim_gallery": d["trim"],
                 "identify_flip": d["flip"]}
    views, weight = parse_room_views(d["gallery_room_views"])
    if views:  # the production check indexes the gallery on the same tune-half rooms
        args.work.mkdir(parents=True, exist_ok=True)
        rooms_list = args.work / "tune_rooms.txt"
        rooms_list.write_text("".join(f"{p}\n" for p in tune_rooms))
        overrides.update(identify_gallery_backgrounds=str(rooms_list),
                         identify_gallery_room_views=views, identify_gallery_clean_weight=weight)
    if args.fallback_classes:  # the whole photo for a class with no box, as identify does it
        overrides.update(identify_fallback_classes=args.fallback_classes.split(","),
                         identify_fallback_embedding=args.fallback_embedding)
    result["chosen_settings"] = overrides
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=sorted))  # the variants, kept early
    listing = write_listing(gallery, args.work / "gallery.csv")
    if not args.no_production_check:
        t0 = time.time()
        result["production_check"] = production_check(
            rooms, gallery, listing, args.work, settings.with_overrides(**overrides), model)
        result["production_check"]["wall_s"] = round(time.time() - t0, 1)
        for spec in args.production_variant:
            name, _, extra = spec.partition("=")
            t0 = time.time()
            check = production_check(rooms, gallery, listing, args.work,
                                     settings.with_overrides(**{**overrides, **json.loads(extra)}),
                                     model)
            result.setdefault("production_variants", {})[name] = {
                **check, "settings": json.loads(extra), "wall_s": round(time.time() - t0, 1)}
    if args.cost_photos:
        paths = [r["path"] for r in rooms][:args.cost_photos + 2]
        # A/B in one child: the defaults before this round (8 objects, 2 per class, any
        # configured class, crops at 224), the chosen variant, and any --cost-variant.
        before = {**overrides, "identify_image_size": 0, "identify_crop_size": 0,
                  "identify_max_objects": 8, "identify_max_per_class": 2,
                  "identify_fallback_classes": [], "identify_fallback_embedding": ""}
        variants = [{"name": "before", "overrides": before, "all_classes": True},
                    {"name": "chosen", "overrides": overrides}]
        for spec in args.cost_variant:
            name, _, extra = spec.partition("=")
            variants.append({"name": name, "overrides": {**overrides, **json.loads(extra)}})
        result["cost"] = measure_cost(listing, args.work, variants, model, paths)
    result["wall_s"] = round(time.time() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=sorted))
    for m in ("whole_image", "detect", "detect_or_whole"):
        b = best[m]
        print(m, {k: b.get(k) for k in ("backbone", "trim", "flip", "margin", "min_score",
                                         "max_objects")})
        for split in ("tune", "report", "all"):
            print("  ", split, json.dumps(b["table"][split]))
    if "production_check" in result:
        print("production_check all", json.dumps(result["production_check"]["all"]))
        print("production_check tune", json.dumps(result["production_check"]["tune"]))
    for name, check in result.get("production_variants", {}).items():
        for split in ("tune", "report"):
            print(f"production {name} {split}", json.dumps(check[split]))
    print("cost", json.dumps(result.get("cost")))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

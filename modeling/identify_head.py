"""Train the projection head identify embeds with, on product photos that are NOT the gallery.

    python -m modeling.identify_head --photos ../shared/datasets/ikea/images/objects \
        --exclude-listing GALLERY.csv --out ~/.cache/shoplens/identify/head-ikea-objects

Each photo's file stem is its product id and each product is one class (a cosine-margin softmax,
``modeling.embedding.train_head``, as the search embedding is trained); photos are trimmed to the
product as the gallery is, and each is also seen through ``--views`` random re-framings (crops,
mirror, colour jitter) to look more like a detected crop, and through ``--room-views`` room-like
views (:func:`room_like_view`: the product cut from its white backdrop, pasted on a patch of one
of the ``--backgrounds`` photos, partly covered, relit, and cropped as a detector box is).
Products whose id is in the
``--exclude-listing`` (a ``path,product_id,class`` gallery listing) are left out, so the head
never sees a product it will be asked to find. The output is an embedding directory
(``Embedder.save``); point ``identify_embedding`` (SHOPLENS_IDENTIFY_EMBEDDING) at it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from modeling.embedding import HeadTraining, augmented_features, train_head
from modeling.identify import BACKDROP_BORDER, BACKDROP_LEVEL, read_listing, trimmed_to_product
from shoplens.config import Settings
from shoplens.progress import progress
from shoplens.vision import images
from shoplens.vision.crops import square_crop
from shoplens.vision.embedding import Embedder

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}
BACKGROUND_SIDE = 640           # backgrounds are kept decoded at most this long a side
PRODUCT_SHARE = (0.25, 0.85)    # the pasted product's long side / the patch's short side
PATCH_SHARE = (0.4, 1.0)        # the background patch's sides / the background's
OCCLUDED = 0.6                  # the chance a view has one or two things in front of the product
OCCLUDER_SIDE = (0.2, 0.6)      # an occluder's sides / the product box's (covers <= 36 % each)
JITTER = (0.7, 1.3)             # brightness, contrast, saturation factors
LIGHT_TINT = (0.9, 1.1)         # per-channel gain: warm or cool room light


def training_photos(folder: Path, exclude: set[str]) -> list[Path]:
    """The folder's photos whose product id (file stem) is not excluded, sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in PHOTO_SUFFIXES and p.stem not in exclude)


def background_photos(source: Path) -> list[Path]:
    """The background photos ``source`` names: every photo under a folder, or a text file's
    paths (one a line). Only these are ever read: a benchmark that holds rooms out passes a
    list without them (``benchmarks/identify_ikea.py --write-tune-rooms``)."""
    if source.is_dir():
        return sorted(p for p in source.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    return [Path(line.strip()) for line in source.read_text().splitlines() if line.strip()]


def load_backgrounds(paths: list[Path]) -> list[Image.Image]:
    out = []
    for p in paths:
        img = images.decode(images.read_file(str(p)), str(p))
        img.thumbnail((BACKGROUND_SIDE, BACKGROUND_SIDE))
        out.append(img)
    return out


def product_cutout(image: Image.Image) -> tuple[Image.Image, Image.Image] | None:
    """The product of a catalogue photo on a white backdrop, cut to its extent, and its alpha:
    the non-white pixels with enclosed white (a white seat inside its frame) filled in and one
    pixel grown; None for a photo not on white or with almost no product pixels."""
    from scipy.ndimage import binary_fill_holes

    rgb = np.asarray(image.convert("RGB"))
    dark = rgb.min(axis=2) < BACKDROP_LEVEL
    border = np.concatenate([dark[0], dark[-1], dark[:, 0], dark[:, -1]])
    if border.mean() > 1.0 - BACKDROP_BORDER or dark.sum() < 50:
        return None
    ys, xs = np.nonzero(dark)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    mask = binary_fill_holes(dark[y0:y1, x0:x1])
    alpha = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3))
    return Image.fromarray(rgb[y0:y1, x0:x1]), alpha


def _scaled(cut: tuple[Image.Image, Image.Image], long_side: float):
    product, alpha = cut
    k = long_side / max(product.size)
    size = (max(1, round(product.width * k)), max(1, round(product.height * k)))
    return product.resize(size, Image.Resampling.BILINEAR), alpha.resize(size, Image.Resampling.BILINEAR)


def room_like_view(cut: tuple[Image.Image, Image.Image], backgrounds: list[Image.Image],
                   rng: np.random.Generator, size: int,
                   occluders: list[tuple[Image.Image, Image.Image]] = (),
                   occluded: float = OCCLUDED) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """One room-like view of a product (``cut`` from :func:`product_cutout`): a random patch of a
    background photo, the product pasted on it at a random scale and place (mirrored half the
    time), with chance ``occluded`` one or two things in front of it (a rectangle of another
    background or flat colour, or another product from ``occluders``), brightness / contrast /
    saturation and light-colour jitter; then the square around the pasted product, margin 0,
    ``size`` px, as identify crops a detected box (``square_crop``). Returns the view and the
    pasted product's box in the patch's pixels."""
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    pw = max(16, round(bg.width * rng.uniform(*PATCH_SHARE)))
    ph = max(16, round(bg.height * rng.uniform(*PATCH_SHARE)))
    px, py = int(rng.integers(0, bg.width - pw + 1)), int(rng.integers(0, bg.height - ph + 1))
    canvas = bg.crop((px, py, px + pw, py + ph)).convert("RGB")
    product, alpha = _scaled(cut, min(pw, ph) * rng.uniform(*PRODUCT_SHARE))
    if rng.random() < 0.5:
        product = product.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        alpha = alpha.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x0 = int(rng.integers(0, pw - product.width + 1))
    y0 = int(rng.integers(0, ph - product.height + 1))
    canvas.paste(product, (x0, y0), alpha)
    box = (x0, y0, x0 + product.width, y0 + product.height)
    if rng.random() < occluded:
        for _ in range(int(rng.integers(1, 3))):
            ow = max(1, round(product.width * rng.uniform(*OCCLUDER_SIDE)))
            oh = max(1, round(product.height * rng.uniform(*OCCLUDER_SIDE)))
            # anchored on the product box's edge or inside it, as a thing in front of it is
            ox = int(rng.integers(x0 - ow // 2, box[2] - ow // 2 + 1))
            oy = int(rng.integers(y0 - oh // 2, box[3] - oh // 2 + 1))
            kind = rng.random()
            if occluders and kind < 0.4:
                other, other_alpha = _scaled(occluders[int(rng.integers(len(occluders)))],
                                             max(ow, oh))
                canvas.paste(other, (ox, oy), other_alpha)
            elif kind < 0.7:
                src = backgrounds[int(rng.integers(len(backgrounds)))]
                sx = int(rng.integers(0, max(1, src.width - ow) + 1))
                sy = int(rng.integers(0, max(1, src.height - oh) + 1))
                canvas.paste(src.crop((sx, sy, sx + ow, sy + oh)).convert("RGB"), (ox, oy))
            else:
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                canvas.paste(Image.new("RGB", (ow, oh), colour), (ox, oy))
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        canvas = enhance(canvas).enhance(rng.uniform(*JITTER))
    tint = rng.uniform(*LIGHT_TINT, size=3)
    canvas = Image.fromarray(np.clip(np.asarray(canvas, np.float32) * tint, 0, 255)
                             .astype(np.uint8))
    return square_crop(canvas, box, 0.0, size=size), box


def _room_view_features(base: Embedder, decoded: list[Image.Image], backgrounds, views: int,
                        seed: int) -> np.ndarray:
    """(views, N, F) features of room-like views of a batch; a photo not on a white backdrop is
    seen through its trimmed square instead (nothing to cut out). The batch's other products
    are the occluders."""
    rng = np.random.default_rng(seed)
    cuts = [product_cutout(img) for img in decoded]
    others = [c for c in cuts if c is not None]
    out = []
    for _ in range(views):
        crops = [room_like_view(c, backgrounds, rng, base.image_size,
                                [o for o in others if o is not c])[0] if c is not None
                 else trimmed_to_product(img) for c, img in zip(cuts, decoded)]
        out.append(base.features(base.centre_crops(base.squares(crops))))
    return np.stack(out)


def train(photos: list[Path], settings: Settings, views: int = 1,
          cfg: HeadTraining | None = None, room_views: int = 0,
          backgrounds: list[Path] = (), features_cache: Path | None = None) -> Embedder:
    """The head trained on every photo's trimmed square, ``views`` random re-framings of it and
    ``room_views`` room-like views on ``backgrounds`` (the only other photos read). The backbone
    features (nearly all the time) are kept in ``features_cache`` when given, keyed by what they
    depend on, so heads of other sizes or epochs train on them at once."""
    cfg = cfg or HeadTraining()
    if room_views and not backgrounds:
        raise ValueError("room-like views need background photos")
    base = Embedder(settings.identify_backbone, settings.identify_image_size, settings=settings)
    key = hashlib.sha256(json.dumps(
        [base.backbone, base.image_size, [str(p) for p in photos], views, room_views,
         [str(p) for p in backgrounds], cfg.seed]).encode()).hexdigest()
    if features_cache and features_cache.is_file():
        with np.load(features_cache) as z:
            cached = (z["feats"], z["labels"]) if str(z["key"]) == key else None
    else:
        cached = None
    if cached is None:
        feats, labels = _training_features(base, photos, views, room_views,
                                           load_backgrounds(list(backgrounds)), cfg.seed)
        if features_cache:
            features_cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(features_cache, key=key, feats=feats, labels=labels)
    else:
        feats, labels = cached
    head, report = train_head(feats, labels, cfg)
    report.update(photos=len(photos), augmented_views=views, room_views=room_views,
                  backgrounds=len(backgrounds), trained_on="product photos "
                  "(one class per product), gallery products excluded")
    return base.with_head(head, report)


def _training_features(base: Embedder, photos: list[Path], views: int, room_views: int,
                       backgrounds: list[Image.Image], seed: int):
    clean, extra, rooms, labels = [], [], [], []
    with progress(total=len(photos), desc="identify head: features", unit="photos") as bar:
        for start in range(0, len(photos), 32):
            part = photos[start:start + 32]
            raw = [images.decode(images.read_file(str(p)), str(p)) for p in part]
            sq = base.squares([trimmed_to_product(img) for img in raw])
            clean.append(base.features(base.centre_crops(sq)))
            if views:
                extra.append(augmented_features(base, sq, views, seed + start, 0.35)
                             .reshape(views, len(part), -1))
            if room_views:
                rooms.append(_room_view_features(base, raw, backgrounds, room_views,
                                                 seed + 7919 + start))
            labels += [p.stem for p in part]
            bar.advance(len(part))
    feats = [np.concatenate(clean)]
    for chunks in (extra, rooms):
        if chunks:
            feats += list(np.concatenate(chunks, axis=1))
    return np.concatenate(feats), np.tile(np.array(labels), len(feats))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, required=True, help="folder of <product id>.jpg photos")
    ap.add_argument("--exclude-listing", type=Path, action="append", default=[],
                    help="gallery listing(s) whose product ids are left out of training")
    ap.add_argument("--out", type=Path, required=True, help="embedding directory to write")
    ap.add_argument("--views", type=int, default=1, help="augmented views per photo")
    ap.add_argument("--room-views", type=int, default=0,
                    help="room-like views per photo (pasted on --backgrounds)")
    ap.add_argument("--backgrounds", type=Path, action="append", default=[],
                    help="folder of background photos, or a file listing them (one a line)")
    ap.add_argument("--features-cache", type=Path,
                    help="keep the backbone features here (.npz) and reuse them when they match")
    ap.add_argument("--epochs", type=int, default=HeadTraining.epochs)
    ap.add_argument("--dim", type=int, default=HeadTraining.dim)
    args = ap.parse_args(argv)
    if not args.photos.is_dir():
        print(f"error: {args.photos} is not a folder", file=sys.stderr)
        return 2
    exclude = {r["product_id"] for listing in args.exclude_listing for r in read_listing(listing)}
    photos = training_photos(args.photos, exclude)
    if len(photos) < 2:
        print("error: fewer than 2 training photos", file=sys.stderr)
        return 2
    print(f"{len(photos)} photos ({len(exclude)} gallery products excluded)", flush=True)
    backgrounds = [p for source in args.backgrounds for p in background_photos(source)]
    if args.room_views and not backgrounds:
        print("error: --room-views needs --backgrounds", file=sys.stderr)
        return 2
    embedder = train(photos, Settings(), args.views,
                     HeadTraining(epochs=args.epochs, dim=args.dim), args.room_views,
                     backgrounds, args.features_cache)
    embedder.save(args.out)
    print(f"wrote {args.out}: {embedder.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

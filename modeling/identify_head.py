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
from PIL import Image

from modeling.embedding import HeadTraining, augmented_features, train_head
from modeling.identify import read_listing
from shoplens.config import Settings
from shoplens.progress import progress
from shoplens.vision import images
from shoplens.vision.crops import trimmed_to_product
from shoplens.vision.embedding import Embedder
from shoplens.vision.room_views import (PHOTO_SUFFIXES, background_photos, load_backgrounds,
                                        product_cutout, room_like_view)

def training_photos(folder: Path, exclude: set[str]) -> list[Path]:
    """The folder's photos whose product id (file stem) is not excluded, sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in PHOTO_SUFFIXES and p.stem not in exclude)


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

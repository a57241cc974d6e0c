"""Train the projection head identify embeds with, on product photos that are NOT the gallery.

    python -m modeling.identify_head --photos ../shared/datasets/ikea/images/objects \
        --exclude-listing GALLERY.csv --out ~/.cache/shoplens/identify/head-ikea-objects

Each photo's file stem is its product id and each product is one class (a cosine-margin softmax,
``modeling.embedding.train_head``, as the search embedding is trained); photos are trimmed to the
product as the gallery is, and each is also seen through ``--views`` random re-framings (crops,
mirror, colour jitter) to look more like a detected crop. Products whose id is in the
``--exclude-listing`` (a ``path,product_id,class`` gallery listing) are left out, so the head
never sees a product it will be asked to find. The output is an embedding directory
(``Embedder.save``); point ``identify_embedding`` (SHOPLENS_IDENTIFY_EMBEDDING) at it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from modeling.embedding import HeadTraining, augmented_features, train_head
from modeling.identify import read_listing, trimmed_to_product
from shoplens.config import Settings
from shoplens.progress import progress
from shoplens.vision import images
from shoplens.vision.embedding import Embedder

PHOTO_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}


def training_photos(folder: Path, exclude: set[str]) -> list[Path]:
    """The folder's photos whose product id (file stem) is not excluded, sorted."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix.lower() in PHOTO_SUFFIXES and p.stem not in exclude)


def train(photos: list[Path], settings: Settings, views: int = 1,
          cfg: HeadTraining | None = None) -> Embedder:
    cfg = cfg or HeadTraining()
    base = Embedder(settings.identify_backbone, settings.identify_image_size, settings=settings)
    clean, extra, labels = [], [], []
    with progress(total=len(photos), desc="identify head: features", unit="photos") as bar:
        for start in range(0, len(photos), 32):
            part = photos[start:start + 32]
            decoded = [trimmed_to_product(images.decode(images.read_file(str(p)), str(p)))
                       for p in part]
            sq = base.squares(decoded)
            clean.append(base.features(base.centre_crops(sq)))
            if views:
                extra.append(augmented_features(base, sq, views, cfg.seed + start, 0.35)
                             .reshape(views, len(part), -1))
            labels += [p.stem for p in part]
            bar.advance(len(part))
    feats = np.concatenate(clean)
    labels = np.array(labels)
    if views:
        feats = np.concatenate([feats, *np.concatenate(extra, axis=1)])
    head, report = train_head(feats, np.tile(labels, 1 + views), cfg)
    report.update(photos=len(photos), augmented_views=views, trained_on="product photos "
                  "(one class per product), gallery products excluded")
    return base.with_head(head, report)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--photos", type=Path, required=True, help="folder of <product id>.jpg photos")
    ap.add_argument("--exclude-listing", type=Path, action="append", default=[],
                    help="gallery listing(s) whose product ids are left out of training")
    ap.add_argument("--out", type=Path, required=True, help="embedding directory to write")
    ap.add_argument("--views", type=int, default=1, help="augmented views per photo")
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
    embedder = train(photos, Settings(), args.views,
                     HeadTraining(epochs=args.epochs, dim=args.dim))
    embedder.save(args.out)
    print(f"wrote {args.out}: {embedder.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``shoplens dedup``: near-duplicate clusters of a folder of images, or the nightly stage.

    shoplens dedup [--json] [--threshold N] DIR   # clusters among the image files in DIR
    shoplens dedup --manifest --run-key KEY       # run dataset.dedup.stage.run on the manifest

(alias: ``python -m dataset dedup``)

For a folder, each cluster of two or more images is printed; with ``--json`` as one JSON object
per line: ``{"representative", "size", "members": [{"path", "distance", "width", "height"}]}``
(the representative is the largest image, then the oldest file; it is listed first with distance
0). Files that are not decodable images are listed on stderr and skipped.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from dataset.dedup.clusters import DuplicateRule, component_labels, find_pairs, representative_order
from dataset.dedup.hashing import hamming, hashes_of_image
from shoplens.cli import argument_parser, command, emit, parse_args
from shoplens.config import ConfigError, Settings
from shoplens.photos import PhotoLimits, PhotoRejected, decode_photo, read_photo_file
from shoplens.progress import progress


def _hash_files(root: Path, limits: PhotoLimits, show_progress: bool | None = None):
    hashed, skipped = [], []
    files = sorted(p for p in root.rglob("*") if p.is_file())
    for path in progress(files, "dedup hashing", unit="files", enabled=show_progress):
        try:
            photo = decode_photo(read_photo_file(path, limits), limits)
        except PhotoRejected as exc:
            skipped.append((path, exc.message))
            continue
        except OSError as exc:
            skipped.append((path, exc.strerror or str(exc)))
            continue
        hashes = hashes_of_image(photo.image)
        hashed.append({"path": str(path), "phash": hashes.phash, "dhash": hashes.dhash,
                       "width": photo.width, "height": photo.height, "mtime": path.stat().st_mtime})
    return hashed, skipped


def folder_clusters(root: Path, threshold: int, limits: PhotoLimits = PhotoLimits(),
                    show_progress: bool | None = None) -> tuple[list[dict], list[tuple[Path, str]]]:
    """Clusters (two or more members) among the image files under ``root``, largest cluster
    first. ``show_progress=False`` keeps the progress bar off (see :mod:`shoplens.progress`)."""
    files, skipped = _hash_files(root, limits, show_progress)
    rule = DuplicateRule(threshold)
    pairs = find_pairs(np.array([f["phash"] for f in files], dtype=np.int64),
                       np.array([f["dhash"] for f in files], dtype=np.int64), rule)
    labels = component_labels(len(files), pairs.first, pairs.second)
    groups: dict[int, list[int]] = {}
    for k, label in enumerate(labels):
        groups.setdefault(int(label), []).append(k)
    clusters = []
    for members in groups.values():
        if len(members) < 2:
            continue
        order = representative_order([files[k]["width"] * files[k]["height"] for k in members],
                                     [files[k]["mtime"] for k in members],
                                     [files[k]["path"] for k in members])
        ranked = [files[members[i]] for i in order]
        rep = ranked[0]
        clusters.append({
            "representative": rep["path"], "size": len(ranked),
            "members": [{"path": f["path"],
                         "distance": hamming(f["phash"], rep["phash"]) + hamming(f["dhash"], rep["dhash"]),
                         "width": f["width"], "height": f["height"]} for f in ranked],
        })
    clusters.sort(key=lambda c: (-c["size"], c["representative"]))
    return clusters, skipped


@command()
def main(argv: list[str] | None = None) -> int:
    """Near-duplicate clusters of a folder of images, or the nightly dedup stage"""
    parser = argument_parser("python -m dataset dedup", __doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", type=Path, help="folder of image files (searched recursively)")
    parser.add_argument("--threshold", type=int, default=None,
                        help="max pHash + dHash distance (default: SHOPLENS_DEDUP_THRESHOLD or 25)")
    parser.add_argument("--manifest", action="store_true", help="run the dedup stage on the manifest")
    parser.add_argument("--run-key", default="manual-dedup", help="crawl run key for provenance (--manifest)")
    args = parse_args(parser, argv)
    try:
        settings = Settings.from_env()
        if args.threshold is not None:
            settings = settings.with_overrides(dedup_threshold=args.threshold)
        DuplicateRule(settings.dedup_threshold)
    except (ConfigError, ValueError) as exc:
        parser.error(str(exc))

    if args.manifest:
        from dataset.dedup import stage as dedup

        emit(dedup.run(settings, args.run_key))
        return 0
    if args.directory is None:
        parser.error("give a DIR of images, or --manifest")
    if not args.directory.is_dir():
        parser.error(f"{args.directory} is not a directory")

    clusters, skipped = folder_clusters(args.directory, settings.dedup_threshold,
                                        PhotoLimits.from_settings(settings),
                                        show_progress=False if args.json else None)
    for path, why in skipped:
        print(f"skipped {path}: not a decodable image ({why})", file=sys.stderr)
    for cluster in clusters:
        if args.json:
            print(json.dumps(cluster, ensure_ascii=False))
        else:
            print(f"{cluster['size']} near-duplicates, keep {cluster['representative']}")
            for member in cluster["members"][1:]:
                print(f"    {member['path']}  (distance {member['distance']})")
    if not args.json:
        print(f"{len(clusters)} clusters of near-duplicates (threshold {settings.dedup_threshold})",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

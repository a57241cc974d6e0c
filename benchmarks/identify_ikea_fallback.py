"""Detect-then-identify with another embedding for the whole-image fallback (issue 17).

Scores, on the caches ``benchmarks/identify_ikea.py`` left in ``--work`` (run it first with both
backbones), a detect variant (trimmed gallery, margin 0, ``--min-score``, ``--max-objects``) where each
(room, class) with no box of the class is queried by the whole photo embedded with
``--fallback`` (e.g. ``head=results/identify_head_objects``) against the gallery embedded the
same way, while detected objects keep ``--backbone``. Prints R@1/R@10 per split and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import identify_ikea as B  # noqa: E402

from shoplens.config import Settings  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--fallback", required=True)
    ap.add_argument("--min-score", type=float, default=0.05)
    ap.add_argument("--max-objects", default="8p2")
    ap.add_argument("--all-classes", action="store_true",
                    help="boxes of classes the gallery has no product of count under the caps")
    ap.add_argument("--work", type=Path, default=B.REPO / "results" / "identify_ikea_work")
    ap.add_argument("--out", type=Path, default=B.REPO / "results" / "identify_ikea_fallback.json")
    args = ap.parse_args(argv)
    ikea = B.SHARED / "datasets" / "ikea"
    gallery = B.read_gallery(ikea)
    rooms = B.read_rooms(ikea, ikea / "images" / "room_scenes", gallery)
    cache = B.Cache(args.work)
    boxes = B.detections(cache, rooms, str(B.SHARED / "models" / "yolox_nano.onnx"), Settings())
    classes = set(Settings().identify_classes)
    if not args.all_classes:  # as identify does: only classes the gallery has products of
        classes &= set(B.FOLDERS.values())
    B.NEEDED.update(min_score=0.05, classes=classes)
    gb = B.gallery_vectors(cache, gallery, args.backbone, True, False)
    gf = B.gallery_vectors(cache, gallery, args.fallback, True, False)
    crops = B.room_vectors(cache, rooms, boxes, args.backbone, 0.0, False)
    whole = B.room_vectors(cache, rooms, boxes, args.fallback, None, False)
    # One gallery vector = both embeddings side by side; a query fills only its own half.
    gvec = np.concatenate([gb, gf], 1)
    zb, zf = np.zeros(gb.shape[1]), np.zeros(gf.shape[1])

    def query(r, c):
        bx = boxes[r["name"]]
        kept = [i for i in B.objects_of(bx, args.min_score, args.max_objects, classes) if bx[i][4] == c]
        if not kept:
            return np.concatenate([zb, whole[f"{r['name']}|-1"]])[None], np.zeros(1)
        return (np.stack([np.concatenate([crops[f"{r['name']}|{i}"], zf]) for i in kept]),
                np.zeros(len(kept)))

    table = B.recall_table(rooms, gallery, gvec, query)
    args.out.write_text(json.dumps({"backbone": args.backbone, "fallback": args.fallback,
                                    "min_score": args.min_score,
                                    "max_objects": args.max_objects,
                                    "all_classes": args.all_classes, "table": table}, indent=1))
    for split in ("tune", "report", "all"):
        print(split, " ".join(f"{c} {table[split][c]['R@1']:.3f}/{table[split][c]['R@10']:.3f}"
                              for c in ("chair", "couch", "dining table")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

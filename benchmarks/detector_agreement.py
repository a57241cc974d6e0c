"""Do identify's cost options change what is detected? (issue 17) Boxes vs the float detector
on the fully decoded photo.

    SHOPLENS_SHARED_DIR=../shared PYTHONPATH=. nice -n 10 .venv/bin/python \
        benchmarks/detector_agreement.py --int8 INT8.onnx --decode-sides 512,640 \
        --out results/detector_agreement.json

Per variant (the float or the int8 model, the photo decoded in full or at a reduced side through
``modeling.identify.decode_for_identify``) over the IKEA rooms with ground truth: of the
reference boxes, the share matched by a box of the same class with IoU > 0.7 (greedy, best
score first), and the other way round; for every box scoring >= 0.25, and for the objects
identify keeps (its caps, the gallery's classes). Boxes are compared in full-size pixels.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.identify_ikea import FOLDERS, SHARED, read_gallery, read_rooms  # noqa: E402
from shoplens.config import Settings  # noqa: E402

MATCH_IOU = 0.7


def matched_share(reference: list, other: list) -> tuple[int, int, list[float]]:
    """(reference boxes matched, reference boxes, IoUs of the matches): same class, IoU > 0.7,
    each box of ``other`` used once."""
    from shoplens.vision.detector import iou

    free = list(other)
    hits, ious = 0, []
    for label, box in reference:
        same = [i for i, (lab, _) in enumerate(free) if lab == label]
        if same:
            overlaps = iou(np.array(box), np.array([free[i][1] for i in same]))
            best = int(np.argmax(overlaps))
            if overlaps[best] > MATCH_IOU:
                hits += 1
                ious.append(float(overlaps[best]))
                free.pop(same[best])
    return hits, len(reference), ious


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=SHARED)
    ap.add_argument("--int8", help="an int8 detector model file to compare")
    ap.add_argument("--decode-sides", default="512", help="identify_decode_side values (0 = full)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "detector_agreement.json")
    args = ap.parse_args(argv)
    from modeling.identify import decode_for_identify, detect_objects, identify_detector

    ikea = args.shared / "datasets" / "ikea"
    model = str(args.shared / "models" / "yolox_nano.onnx")
    rooms = read_rooms(ikea, ikea / "images" / "room_scenes", read_gallery(ikea))
    base = Settings().with_overrides(detector_model_path=model)
    searchable = frozenset(FOLDERS.values())
    models = {"float": model, **({"int8": args.int8} if args.int8 else {})}
    sides = [int(x) for x in args.decode_sides.split(",")]
    variants = {f"{name}_decode{side or 'full'}": base.with_overrides(
        identify_detector_model_path=path, identify_decode_side=side)
        for name, path in models.items() for side in [0, *sides]}
    detectors = {path: identify_detector(base.with_overrides(identify_detector_model_path=path))
                 for path in models.values()}

    def boxes(settings: Settings, data: bytes) -> tuple[list, list]:
        photo = decode_for_identify(data, settings)
        sx, sy = photo.width / photo.image.width, photo.height / photo.image.height
        det = detectors[settings.identify_detector_model_path]
        scaled = [(b.label, [b.x1 * sx, b.y1 * sy, b.x2 * sx, b.y2 * sy], b.score)
                  for b in det.detect(photo.image)]
        confident = [(lab, box) for lab, box, score in scaled if score >= 0.25]
        kept = [(o.label, [o.x0 * sx, o.y0 * sy, o.x1 * sx, o.y1 * sy])
                for o in detect_objects(photo.image, det, settings, searchable)]
        return confident, kept

    per = {name: {"confident": [], "kept": []} for name in variants}
    for r in rooms:
        data = Path(r["path"]).read_bytes()
        for name, settings in variants.items():
            confident, kept = boxes(settings, data)
            per[name]["confident"].append(confident)
            per[name]["kept"].append(kept)
    reference = "float_decodefull"
    result = {"rooms": len(rooms), "match_iou": MATCH_IOU, "reference": reference, "variants": {}}
    for name in variants:
        row = {}
        for kind in ("confident", "kept"):
            a = [matched_share(ref, mine) for ref, mine in zip(per[reference][kind], per[name][kind])]
            b = [matched_share(mine, ref) for ref, mine in zip(per[reference][kind], per[name][kind])]
            ious = [v for _, _, x in a for v in x]
            row[kind] = {"reference_boxes": sum(n for _, n, _ in a),
                         "boxes": sum(n for _, n, _ in b),
                         "reference_matched": round(sum(h for h, _, _ in a) / max(1, sum(n for _, n, _ in a)), 3),
                         "own_matched": round(sum(h for h, _, _ in b) / max(1, sum(n for _, n, _ in b)), 3),
                         "mean_iou_of_matches": round(float(np.mean(ious)), 3) if ious else None}
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    result["load_average"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

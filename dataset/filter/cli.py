"""``shoplens filter``: the filter's rules on image files, or the nightly run on the manifest.

    shoplens filter --json photo1.jpg photo2.jpg     # one JSON object per line
    shoplens filter --category 10120000 photo.jpg    # product classes of that category
    shoplens filter --manifest --run-key manual-1    # what the nightly DAG runs

(alias: ``python -m dataset filter``)

JSON fields: ``verdict`` (keep/reject), ``reasons`` (failed rules), ``occupancy`` (float, 0..1: the
share of the frame the main product covers; 0.0 when no product was found, i.e. the image is
unreadable or no product box was detected on a cluttered background, where the occupancy rule
follows ``SHOPLENS_FILTER_OCCUPANCY_WHEN_UNKNOWN``, "pass" by default), ``products`` (products
counted), ``boxes`` (detections at or above the rules' score threshold).

Thresholds and the model path come from Settings (env ``SHOPLENS_FILTER_*``,
``SHOPLENS_DETECTOR_MODEL_PATH``).
"""
from __future__ import annotations

import json
import sys

from shoplens.cli import BadInput, argument_parser, command, emit, parse_args
from shoplens.config import Settings
from shoplens.photos import PhotoLimits


@command()
def main(argv: list[str] | None = None) -> int:
    """Detector-assisted rules on image files, or the nightly filter stage on the manifest"""
    ap = argument_parser("python -m dataset filter", __doc__.split("\n\n")[0])
    ap.add_argument("images", nargs="*", help="image files to judge")
    ap.add_argument("--category", help="shop category id whose product classes apply")
    ap.add_argument("--model", help="detector ONNX file (default: settings.detector_model_path)")
    ap.add_argument("--manifest", action="store_true",
                    help="run the nightly stage on the manifest instead of files")
    ap.add_argument("--run-key", help="run key for --manifest (e.g. the Airflow run id)")
    args = parse_args(ap, argv)

    from dataset.filter import stage, rules
    from shoplens.vision.detector import Detector, DetectorError

    if args.manifest and not args.run_key:
        ap.error("--manifest needs --run-key")
    if not args.manifest and not args.images:
        ap.error("give image files, or --manifest --run-key KEY")
    try:
        settings = Settings.from_env()
        if args.model:
            settings = settings.with_overrides(detector_model_path=args.model)
        params = rules.params_from_settings(settings)
        if not args.manifest:
            detector = Detector(settings.detector_model_path,
                                min_score=settings.detector_store_min_score)
    except (ValueError, DetectorError) as exc:  # bad thresholds, a missing or unusable model file
        raise BadInput(str(exc)) from exc
    if args.manifest:
        try:
            stats = stage.run(settings, args.run_key)
        except DetectorError as exc:  # the model file is missing or unusable
            raise BadInput(str(exc)) from exc
        emit(stats)
        return 0

    from shoplens.progress import progress

    failures = 0
    # The bar (on a terminal only) goes to stderr; --json keeps it off so stderr holds only errors.
    for path in progress(args.images, "filter", unit="photos", enabled=not args.json):
        try:
            result = next(iter(stage.decide_files(detector, [path], params, args.category,
                                                   PhotoLimits.from_settings(settings))))
        except OSError as exc:
            print(f"error: {path}: {exc.strerror or exc}", file=sys.stderr)
            failures += 1
            continue
        if args.json:
            result.pop("details")
            print(json.dumps(result, ensure_ascii=False), flush=True)
        else:
            why = ", ".join(result["reasons"]) or "-"
            measured = result["details"].get("occupancy", {}).get("score") is not None
            occ = f"{result['occupancy']:.0%}" if measured else "none"
            print(f"{result['verdict']:<6} occupancy={occ:<5} products={result['products']} "
                  f"reasons={why}  {path}", flush=True)
    return 1 if failures else 0

"""python -m modeling {train,evaluate,predict,export}: the modeling stage's command line."""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from shoplens.config import Settings


def _cache_dir(settings: Settings) -> Path:
    base = Path(settings.model_work_dir) if settings.model_work_dir else \
        Path.home() / ".cache" / "shoplens"
    return base / "models-cache"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeling", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train, evaluate, store and maybe promote an ensemble")
    p.add_argument("--version", required=True, help="dataset version id (or a local dataset folder)")
    p = sub.add_parser("evaluate", help="score an ensemble on a dataset version's test split")
    p.add_argument("--model", help="model id or ensemble directory (default: current model)")
    p.add_argument("--version", required=True, help="dataset version id or local dataset folder")
    p = sub.add_parser("predict", help="top-3 products for photos (files or directories)")
    p.add_argument("--model", help="model id or exported ensemble directory (default: current)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("images", nargs="+")
    p = sub.add_parser("export", help="copy a stored model to a local directory")
    p.add_argument("--model", help="model id (default: current model)")
    p.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    settings = Settings.from_env()
    from modeling.registry import ModelNotFound

    try:
        return _run(settings, args)
    except ModelNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(settings: Settings, args) -> int:
    if args.command == "train":
        from modeling import train

        print(json.dumps(train.run(settings, args.version), indent=1, ensure_ascii=False))
        return 0
    if args.command == "predict":
        from modeling import predict

        return predict.main(settings, args.model, args.images, args.json, _cache_dir(settings))
    if args.command == "evaluate":
        return _evaluate(settings, args)
    if args.command == "export":
        from modeling import registry

        if args.out.exists() and any(args.out.iterdir()):
            raise SystemExit(f"error: {args.out} exists and is not empty")
        model_id, src = registry.fetch(settings, args.model, _cache_dir(settings))
        shutil.copytree(src, args.out, dirs_exist_ok=True)
        print(json.dumps({"model_id": model_id, "out": str(args.out)}))
        return 0
    return 2


def _evaluate(settings: Settings, args) -> int:
    from modeling import registry, train
    from modeling.dataset_layout import open_dataset
    from modeling.ensemble import is_ensemble_dir

    model = args.model or registry.current_model_id(settings)
    if not model:
        raise SystemExit("error: no current model and no --model given")
    base = train.work_dir(settings)
    dataset = open_dataset(settings, args.version, base)
    scores, tta = train.evaluate_model_on(settings, model, dataset, base)
    if not is_ensemble_dir(model):  # a registered model: keep its scores in the manifest
        with registry.session_scope(settings.manifest_url) as conn:
            registry.save_metrics(conn, registry.metric_rows(model, dataset.version_id, "test",
                                                             scores, tta))
    print(json.dumps({"model": model, "dataset_version": dataset.version_id, "tta": tta,
                      "test": scores}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

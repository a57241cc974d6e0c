"""The modeling stage's commands: ``shoplens train|evaluate|predict|export`` and the model
lifecycle ``shoplens models list|promote|rollback`` and the search index ``shoplens index
refresh|list`` (alias ``python -m modeling ...``).

Models are of two kinds (``--kind``): the closed-set ``ensemble`` (the default) and the search
``embedding``; each kind has its own current model."""
from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

from modeling.dataset_layout import DatasetError
from modeling.ensemble import EnsembleError
from modeling.catalogue_index import IndexNotFound
from modeling.registry import KINDS, ModelNotFound, PromotionRefused
from shoplens.cli import BadInput, argument_parser, command, emit, parse_args
from shoplens.config import Settings

# Unknown model or dataset version, a folder that is not one, a promotion that cannot be done.
BAD_INPUT = (ModelNotFound, DatasetError, EnsembleError, PromotionRefused, IndexNotFound)


def _cache_dir(settings: Settings) -> Path:
    from modeling.registry import cache_dir

    return cache_dir(settings)


def _logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _dataset_version_flag(parser, help_text: str) -> None:
    parser.add_argument("--dataset-version", dest="dataset_version", metavar="V",
                        help=help_text + " (required)")


def _require_dataset_version(parser, args) -> str:
    if not args.dataset_version:
        parser.error("the following arguments are required: --dataset-version")
    return args.dataset_version


def _kind_flag(parser, help_text: str, default: str | None = "ensemble") -> None:
    parser.add_argument("--kind", choices=KINDS, default=default, help=help_text)


@command(bad_input=BAD_INPUT)
def train(argv: list[str] | None = None) -> int:
    """Train, evaluate, store and maybe promote an ensemble (--kind embedding: search embedding)"""
    parser = argument_parser("python -m modeling train", train.__doc__,
                             legacy_version_dest="dataset_version")
    _dataset_version_flag(parser, "dataset version id, e.g. v0007 (or a local dataset folder)")
    _kind_flag(parser, "ensemble (closed-set classifier, default) or embedding (search "
               "embedding, gated against the untrained baseline and the current embedding)")
    args = parse_args(parser, argv)
    version = _require_dataset_version(parser, args)
    _logging()
    if args.kind == "embedding":
        from modeling import train_embedding as training
    else:
        from modeling import train as training

    emit(training.run(Settings.from_env(), version))
    return 0


@command(bad_input=BAD_INPUT)
def evaluate(argv: list[str] | None = None) -> int:
    """Score an ensemble on a dataset version's test split (stored for a registered model)"""
    parser = argument_parser("python -m modeling evaluate", evaluate.__doc__,
                             legacy_version_dest="dataset_version")
    parser.add_argument("--model", help="model id or ensemble directory (default: current model)")
    _dataset_version_flag(parser, "dataset version id or local dataset folder")
    args = parse_args(parser, argv)
    version = _require_dataset_version(parser, args)
    _logging()
    settings = Settings.from_env()
    from modeling import registry
    from modeling import train as training
    from modeling.ensemble import is_ensemble_dir
    from modeling.dataset_layout import open_dataset

    model = args.model or registry.current_model_id(settings)
    if not model:
        raise ModelNotFound("no current model and no --model given")
    base = training.work_dir(settings)
    dataset = open_dataset(settings, version, base)
    scores, tta = training.evaluate_model_on(settings, model, dataset, base)
    if not is_ensemble_dir(model):  # a registered model: keep its scores in the manifest
        with registry.session_scope(settings.manifest_url) as conn:
            registry.save_metrics(conn, registry.metric_rows(model, dataset.version_id, "test",
                                                             scores, tta))
    emit({"model": model, "dataset_version": dataset.version_id, "tta": tta, "test": scores})
    return 0


@command(bad_input=BAD_INPUT)
def predict(argv: list[str] | None = None) -> int:
    """Top-3 products for photos (files or directories)"""
    parser = argument_parser("python -m modeling predict", predict.__doc__)
    parser.add_argument("--model", help="model id or exported ensemble directory (default: current)")
    parser.add_argument("images", nargs="+")
    args = parse_args(parser, argv)
    _logging()
    settings = Settings.from_env()
    from modeling import predict as predicting

    return predicting.main(settings, args.model, args.images, args.json, _cache_dir(settings))


@command(bad_input=BAD_INPUT)
def export(argv: list[str] | None = None) -> int:
    """Copy a stored model to a local directory (one that predict --model DIR accepts)"""
    parser = argument_parser("python -m modeling export", export.__doc__)
    parser.add_argument("--model", help="model id (default: current model)")
    parser.add_argument("--out", required=True, type=Path)
    args = parse_args(parser, argv)
    if args.out.exists() and any(args.out.iterdir()):
        raise BadInput(f"{args.out} exists and is not empty")
    settings = Settings.from_env()
    from modeling import registry

    model_id, src = registry.fetch(settings, args.model, _cache_dir(settings))
    shutil.copytree(src, args.out, dirs_exist_ok=True)
    emit({"model_id": model_id, "out": str(args.out)})
    return 0


def _model_line(m: dict) -> str:
    names = ("R@1", "R@3") if m["kind"] == "embedding" else ("top1", "top3")
    score = (f"{names[0]} {m['top1']:.3f} {names[1]} {m['top3']:.3f}" if m["top1"] is not None
             else "not scored")
    return (f"{'*' if m['current'] else ' '} {m['id']}  {m['status']:<8} {m['kind']:<9} "
            f"trained on {m['dataset_version']}  {score}  {m['reason'] or ''}").rstrip()


@command(bad_input=BAD_INPUT)
def models_list(argv: list[str] | None = None) -> int:
    """Every model with its kind, status and test scores; each kind's current one is marked *"""
    parser = argument_parser("python -m modeling models list", models_list.__doc__)
    _kind_flag(parser, "only models of this kind (default: every kind)", default=None)
    args = parse_args(parser, argv)
    from modeling import registry

    models = registry.list_models(Settings.from_env(), args.kind)
    if not models:
        print("no models yet", file=sys.stderr)
    for m in models:
        emit(m, _model_line)
    return 0


def _promotion_line(result: dict) -> str:
    if not result["changed"]:
        return result["reason"]
    what = "model" if result["kind"] == "ensemble" else result["kind"]
    return (f"current {what}: {result['model_id']} "
            f"(was {result['previous_model_id'] or 'none'}); {result['reason']}")


@command(bad_input=BAD_INPUT)
def models_promote(argv: list[str] | None = None) -> int:
    """Make a complete model the current one of its kind (what predict, the UI or search use)"""
    parser = argument_parser("python -m modeling models promote", models_promote.__doc__)
    parser.add_argument("model_id")
    parser.add_argument("--reason", required=True, help="why (kept in model_promotions)")
    args = parse_args(parser, argv)
    from modeling import registry

    emit(registry.promote(Settings.from_env(), args.model_id, args.reason), _promotion_line)
    return 0


@command(bad_input=BAD_INPUT)
def models_rollback(argv: list[str] | None = None) -> int:
    """Make the previously current model of a kind current again (or --to MODEL)"""
    parser = argument_parser("python -m modeling models rollback", models_rollback.__doc__)
    parser.add_argument("--to", metavar="MODEL_ID", help="roll back to this model instead")
    parser.add_argument("--reason", default="", help="why (kept in model_promotions)")
    _kind_flag(parser, "which kind's current model to roll back (default: ensemble)")
    args = parse_args(parser, argv)
    from modeling import registry

    emit(registry.rollback(Settings.from_env(), args.reason, args.to, args.kind),
         _promotion_line)
    return 0


# --------------------------------------------------------------------------------------------
# The product search index (modeling/catalogue_index.py)
# --------------------------------------------------------------------------------------------
def _index_line(row: dict) -> str:
    threshold = f"threshold {row['threshold']:.3f}" if row["threshold"] is not None else \
        "no threshold"
    when = row["completed_at"] or row["built_at"]
    return (f"{'*' if row['current'] else ' '} {row['id']}  {row['status']:<8} "
            f"{row['products']} products, {row['vectors']} vectors (+{row['added_vectors']}), "
            f"{threshold}, embedding {row['model_id'] or 'baseline'}, "
            f"{'on ' + row['parent_id'] if row['parent_id'] else 'full build'}, "
            f"{when:%Y-%m-%d %H:%M}" + (f"  {row['error']}" if row["error"] else "")).rstrip()


def _refresh_line(stats: dict) -> str:
    return (f"search index {stats['index_id']} ({stats['mode']}): {stats['products']} products, "
            f"{stats['vectors']} vectors, {stats['added_vectors']} added "
            f"({stats['embedded']} photos embedded, {stats['removed_vectors']} removed), "
            f"top-1 threshold {stats['threshold']}, confidence rule "
            f"{stats.get('confidence_rule')}, {stats['seconds']:.1f}s")


@command(bad_input=BAD_INPUT)
def index_refresh(argv: list[str] | None = None) -> int:
    """Build the next product search index: embeds only new photos, unless --full or the embedding changed"""
    parser = argument_parser("python -m modeling index refresh", index_refresh.__doc__)
    parser.add_argument("--full", action="store_true",
                        help="embed every photo again instead of extending the current index")
    parser.add_argument("--run-key", dest="run_key", help="recorded on the index row")
    args = parse_args(parser, argv)
    _logging()
    from modeling import catalogue_index

    emit(catalogue_index.refresh(Settings.from_env(), args.run_key, full=args.full),
         _refresh_line)
    return 0


@command(bad_input=BAD_INPUT)
def index_prune(argv: list[str] | None = None) -> int:
    """Delete old product search index versions, keeping the newest complete ones (the current among them)"""
    parser = argument_parser("python -m modeling index prune", index_prune.__doc__)
    parser.add_argument("--keep", type=int, default=None,
                        help="complete versions to keep (default: search_keep_versions)")
    args = parse_args(parser, argv)
    from modeling import catalogue_index

    settings = Settings.from_env()
    keep = args.keep if args.keep is not None else settings.search_keep_versions
    if keep < 1:
        raise BadInput(f"--keep must be >= 1, got {keep}")
    emit(catalogue_index.prune(settings, keep),
         lambda r: (f"kept {r['kept']} search index version(s); pruned {len(r['pruned'])}"
                    f"{': ' + ', '.join(r['pruned']) if r['pruned'] else ''}; removed "
                    f"{r['removed_objects']} object(s) and {r['removed_chunks']} chunk(s)"
                    + (f"; chunks left alone: {r['chunks_skipped']}" if r["chunks_skipped"]
                       else "")
                    + (f"; {r['removed_network_files']} unused frozen network file(s) deleted "
                       "from the local cache" if r["removed_network_files"] else "")))
    return 0


@command(bad_input=BAD_INPUT)
def index_list(argv: list[str] | None = None) -> int:
    """Every product search index version; the current one (what search answers from) is marked *"""
    parser = argument_parser("python -m modeling index list", index_list.__doc__)
    parse_args(parser, argv)
    from modeling import catalogue_index

    rows = catalogue_index.list_indexes(Settings.from_env())
    if not rows:
        print("no search index yet (shoplens index refresh builds one)", file=sys.stderr)
    for row in rows:
        emit(row, _index_line)
    return 0

"""``shoplens build``: build a dataset version, or inspect / re-materialise one.

    shoplens build [--run-key KEY]            # build from the manifest (prints stats JSON)
    shoplens build --summary [V]              # counts per split and product (Markdown)
    shoplens build --check V                  # re-run the data-quality checks on V
    shoplens build --verify V                 # re-materialise V from the manifest, compare
    shoplens build --rematerialise V --out D  # rebuild V's files from the manifest into D
    shoplens build --materialise V --out D    # download V from the object store into D
        [--parquet P] [--webdataset W]        # ... and export it with the image bytes

(alias: ``python -m dataset build``)
"""
from __future__ import annotations

from datetime import datetime, timezone

from shoplens.cli import BadInput, CommandError, argument_parser, command, emit, parse_args
from shoplens.config import Settings


def _require_version(settings: Settings, version_id: str) -> None:
    """An unknown version is bad input (exit 2), whichever action was asked for."""
    import sqlalchemy as sa

    from shoplens.manifest import engine_for

    with engine_for(settings.manifest_url).connect() as conn:
        known = conn.execute(sa.text("SELECT 1 FROM dataset_versions WHERE version_id = :v"),
                             {"v": version_id}).first()
    if known is None:
        raise BadInput(f"no dataset version {version_id!r} in the manifest")


@command()
def main(argv: list[str] | None = None) -> int:
    """Build a dataset version from the manifest, or check, verify, summarise or download one"""
    parser = argument_parser("python -m dataset build", __doc__.split("\n\n")[0],
                             epilog=__doc__.split("\n\n", 1)[1])
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--summary", nargs="?", const="", metavar="V")
    action.add_argument("--check", metavar="V")
    action.add_argument("--verify", metavar="V")
    action.add_argument("--rematerialise", metavar="V")
    action.add_argument("--materialise", metavar="V")
    parser.add_argument("--out", help="target directory for --rematerialise / --materialise")
    parser.add_argument("--parquet", metavar="DIR",
                        help="with --materialise: also write Parquet files with the image bytes "
                             "(Hugging Face datasets) into DIR")
    parser.add_argument("--webdataset", metavar="DIR",
                        help="with --materialise: also write WebDataset tar shards into DIR")
    parser.add_argument("--run-key", help="idempotency key (default: manual-<UTC timestamp>)")
    parser.add_argument("--min-photos", type=int, help="override dataset_min_photos_per_product")
    parser.add_argument("--max-photos", type=int, help="override dataset_max_photos_per_product")
    args = parse_args(parser, argv)
    if (args.rematerialise or args.materialise) and not args.out:
        parser.error("--rematerialise / --materialise need --out DIR")
    if (args.parquet or args.webdataset) and not args.materialise:
        parser.error("--parquet / --webdataset go with --materialise V --out D")
    settings = Settings.from_env().with_overrides(
        dataset_min_photos_per_product=args.min_photos,
        dataset_max_photos_per_product=args.max_photos)

    from dataset.build import stage as build
    from dataset.build import checks, export

    named = args.check or args.verify or args.rematerialise or args.materialise or args.summary
    if named:
        _require_version(settings, named)
    try:
        if args.summary is not None:
            from shoplens import summary as run_summary
            from shoplens.manifest import engine_for

            with engine_for(settings.manifest_url).connect() as conn:
                counts = run_summary.version_counts(conn, args.summary or None)
            emit(counts, lambda c: run_summary.version_markdown(c).rstrip("\n"))
        elif args.check:
            results = checks.run_sql_checks(settings, args.check)
            missing = checks.missing_objects(settings, args.check)
            for r in results:
                emit({"check": f"{r.table}.{r.name}", "passed": r.passed, "actual": r.actual},
                     lambda c: f"{'ok  ' if c['passed'] else 'FAIL'} {c['check']} ({c['actual']})")
            emit({"check": "objects_present", "passed": not missing, "missing": len(missing)},
                 lambda c: f"{'ok  ' if c['passed'] else 'FAIL'} objects present "
                           f"({c['missing']} missing)")
            return 0 if all(r.passed for r in results) and not missing else 1
        elif args.verify:
            problems = export.verify_export(settings, args.verify)
            emit({"version_id": args.verify, "equal": not problems, "problems": problems},
                 lambda r: "\n".join(r["problems"]) if r["problems"] else
                 f"{args.verify}: the stored files equal a re-materialisation from the manifest")
            return 1 if problems else 0
        elif args.rematerialise:
            emit(export.rematerialise(settings, args.rematerialise, args.out))
        elif args.materialise:
            from shoplens import datasets, export_layout

            out = export_layout.materialise(settings, args.materialise, args.out)
            exported = {}
            for name, out_dir, write in (("parquet", args.parquet, datasets.export_parquet),
                                         ("webdataset", args.webdataset, datasets.export_webdataset)):
                if out_dir:
                    write(out, out_dir)
                    exported[name] = str(out_dir)
            emit({"version_id": args.materialise, "out": str(out), **exported},
                 lambda r: "\n".join([r["out"], *exported.values()]))
        else:
            run_key = args.run_key or f"manual-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
            emit(build.run(settings, run_key))
    except (LookupError, ValueError) as exc:  # no such dataset version, not a version id
        raise BadInput(str(exc)) from exc
    except (checks.DataQualityError, export.ExportError, build.BuildError) as exc:
        raise CommandError(str(exc)) from exc
    return 0

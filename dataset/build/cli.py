"""``python -m dataset build``: build a dataset version, or inspect / re-materialise one.

    python -m dataset build [--run-key KEY]            # build from the manifest (prints stats JSON)
    python -m dataset build --summary [V]              # counts per split and product (Markdown)
    python -m dataset build --check V                  # re-run the data-quality checks on V
    python -m dataset build --verify V                 # re-materialise V from the manifest, compare
    python -m dataset build --rematerialise V --out D  # rebuild V's files from the manifest into D
    python -m dataset build --materialise V --out D    # download V from the object store into D
        [--parquet P] [--webdataset W]                 # ... and export it with the image bytes
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

import sqlalchemy as sa
from minio.error import S3Error

from shoplens.config import ConfigError, Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dataset build",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
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
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env().with_overrides(
            dataset_min_photos_per_product=args.min_photos,
            dataset_max_photos_per_product=args.max_photos)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if (args.rematerialise or args.materialise) and not args.out:
        parser.error("--rematerialise / --materialise need --out DIR")
    if (args.parquet or args.webdataset) and not args.materialise:
        parser.error("--parquet / --webdataset go with --materialise V --out D")

    from dataset.build import stage as build
    from dataset.build import checks, export

    try:
        if args.summary is not None:
            from shoplens import summary as run_summary
            from shoplens.manifest import engine_for

            with engine_for(settings.manifest_url).connect() as conn:
                counts = run_summary.version_counts(conn, args.summary or None)
            print(run_summary.version_markdown(counts), end="")
        elif args.check:
            results = checks.run_sql_checks(settings, args.check)
            missing = checks.missing_objects(settings, args.check)
            for r in results:
                print(f"{'ok  ' if r.passed else 'FAIL'} {r.table}.{r.name} ({r.actual})")
            print(f"{'ok  ' if not missing else 'FAIL'} objects present ({len(missing)} missing)")
            return 0 if all(r.passed for r in results) and not missing else 1
        elif args.verify:
            problems = export.verify_export(settings, args.verify)
            print("\n".join(problems) if problems else
                  f"{args.verify}: the stored files equal a re-materialisation from the manifest")
            return 1 if problems else 0
        elif args.rematerialise:
            files = export.rematerialise(settings, args.rematerialise, args.out)
            print(json.dumps(files, indent=2))
        elif args.materialise:
            print(export.materialise(settings, args.materialise, args.out))
            from shoplens import datasets

            for out_dir, write in ((args.parquet, datasets.export_parquet),
                                   (args.webdataset, datasets.export_webdataset)):
                if out_dir:
                    write(args.out, out_dir)
                    print(out_dir)
        else:
            run_key = args.run_key or f"manual-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}"
            print(json.dumps(build.run(settings, run_key), indent=2, ensure_ascii=False))
    except (checks.DataQualityError, export.ExportError, build.BuildError, LookupError,
            ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except sa.exc.DBAPIError as exc:  # unreachable or un-migrated manifest
        print(f"error: cannot use the manifest: {exc.orig}", file=sys.stderr)
        return 1
    except S3Error as exc:
        print(f"error: the object store refused: {exc}", file=sys.stderr)
        return 1
    return 0

"""Command line of the crawl stage.

    python -m crawler crawl --category 10120000 [--run-key K]   # one category into run K
    python -m crawler run [--run-key K]                         # every configured category, then summary
    python -m crawler summary --run-key K [--json]              # the run summary, every stage

Settings come from the SHOPLENS_* environment variables (see shoplens/config.py).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path


def _default_run_key() -> str:
    return "manual__" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m crawler", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    crawl = sub.add_parser("crawl", help="crawl one category (in this process)")
    crawl.add_argument("--category", required=True, help="8-digit shop category id")
    crawl.add_argument("--run-key", default=None, help="run to add to (default: a new manual run)")
    crawl.add_argument("--stats-file", type=Path, default=None,
                       help="also write the stats JSON here (used by crawl_category)")
    run = sub.add_parser("run", help="crawl every configured category, then finish the run")
    run.add_argument("--run-key", default=None)
    summary = sub.add_parser("summary", help="print a run's summary (every stage) from the manifest")
    summary.add_argument("--run-key", required=True)
    summary.add_argument("--json", action="store_true", help="as JSON instead of text")
    args = parser.parse_args(argv)

    from shoplens.config import ConfigError, Settings

    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from crawler import run as runner

    if args.command == "crawl":
        run_key = args.run_key or _default_run_key()
        try:
            stats = runner.run_spider(settings, args.category, run_key)
        except runner.CrawlError as exc:
            stats = {"category_id": args.category, "run_key": run_key, "error": str(exc)}
        text = json.dumps(stats, ensure_ascii=False, indent=2)
        if args.stats_file:
            args.stats_file.write_text(text)
        print(text)
        if stats.get("error"):
            print(f"error: {stats['error']}", file=sys.stderr)
            return 3
        return 0

    if args.command == "run":
        run_key = args.run_key or _default_run_key()
        try:
            runner.start_run(settings, run_key)
            from shoplens.progress import progress

            for category_id in progress(settings.categories, f"crawl {run_key}",
                                        unit="categories"):
                runner.crawl_category(settings, category_id, run_key)
        except runner.CrawlError as exc:
            print(f"error: {exc}", file=sys.stderr)
            try:
                runner.fail_run(settings, run_key, str(exc))
            except Exception:  # the manifest itself may be what is down
                pass
            return 3
        print(json.dumps(runner.finish_run(settings, run_key), ensure_ascii=False, indent=2))
        return 0

    import sqlalchemy as sa

    from shoplens import summary as run_summary

    try:
        summary = run_summary.for_run(settings, args.run_key)
    except sa.exc.DBAPIError as exc:
        print(f"error: manifest database unavailable: {str(exc.orig).strip()[:300]}",
              file=sys.stderr)
        return 3
    if not summary.found:
        print(f"error: nothing recorded for run_key {args.run_key!r}", file=sys.stderr)
        return 2
    print(json.dumps(summary.as_dict(), ensure_ascii=False, indent=2) if args.json
          else summary.text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

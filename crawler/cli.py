"""Command line of the crawl stage (``shoplens crawl``; alias ``python -m crawler``).

    shoplens crawl run [--run-key K]                          # every configured category, then the summary
    shoplens crawl category --category 10120000 [--run-key K] # one category, in this process
    shoplens crawl summary --run-key K [--json]               # the run summary, every stage

(``crawl`` is the old spelling of ``category``: ``python -m crawler crawl --category ...`` is how
crawler/run.py starts each category's child process.) Settings come from the SHOPLENS_*
environment variables (see shoplens/config.py).
"""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from shoplens.cli import add_json_flag, argument_parser, command, emit, parse_args


def _default_run_key() -> str:
    return "manual__" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")


def _parser():
    parser = argument_parser("python -m crawler", __doc__.split("\n\n")[0],
                             epilog=__doc__.split("\n\n", 1)[1])
    sub = parser.add_subparsers(dest="command", required=True)
    crawl = sub.add_parser("category", aliases=["crawl"], help="crawl one category (in this process)")
    crawl.add_argument("--category", required=True, help="8-digit shop category id")
    crawl.add_argument("--run-key", default=None, help="run to add to (default: a new manual run)")
    crawl.add_argument("--stats-file", type=Path, default=None,
                       help="also write the stats JSON here (used by crawl_category)")
    run = sub.add_parser("run", help="crawl every configured category, then finish the run")
    run.add_argument("--run-key", default=None)
    summary = sub.add_parser("summary", help="print a run's summary (every stage) from the manifest")
    summary.add_argument("--run-key", required=True)
    for subcommand in (crawl, run, summary):
        add_json_flag(subcommand)
    return parser


@command()
def main(argv: list[str] | None = None) -> int:
    """Crawl the shop's review photos into the object store and the manifest"""
    args = parse_args(_parser(), argv)

    from shoplens.cli import BadInput, report
    from shoplens.config import Settings

    settings = Settings.from_env()

    from crawler import run as runner

    if args.command in ("category", "crawl"):
        run_key = args.run_key or _default_run_key()
        try:
            stats = runner.run_spider(settings, args.category, run_key)
            failure = None
        except runner.CrawlError as exc:
            stats = {"category_id": args.category, "run_key": run_key, "error": str(exc)}
            failure = exc
        text = json.dumps(stats, ensure_ascii=False, indent=2)
        if args.stats_file:
            args.stats_file.write_text(text)
        emit(stats)
        if failure is not None:  # the stats (with their error) are written first, then the verdict
            return report(failure, failed=(runner.CrawlError,))
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
            try:
                runner.fail_run(settings, run_key, str(exc))
            except Exception:  # the manifest itself may be what is down
                pass
            return report(exc, failed=(runner.CrawlError,))
        emit(runner.finish_run(settings, run_key))
        return 0

    from shoplens import summary as run_summary

    summary = run_summary.for_run(settings, args.run_key)
    if not summary.found:
        raise BadInput(f"nothing recorded for run_key {args.run_key!r}")
    emit(summary.as_dict(), lambda _: summary.text())
    return 0

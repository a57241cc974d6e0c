"""Command line of the crawl stage (``shoplens crawl``; alias ``python -m crawler``).

    shoplens crawl run [--run-key K]                          # every configured category, then the summary
    shoplens crawl category --category 10120000 [--run-key K] # one category, in this process
    shoplens crawl category --category A --category B ...     # several, in this process, at once
    shoplens crawl summary --run-key K [--json]               # the run summary, every stage

(``crawl`` is the old spelling of ``category``: ``python -m crawler crawl --category ...`` is how
crawler/run.py starts the child process of a group of categories.) Settings come from the SHOPLENS_*
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
    crawl = sub.add_parser("category", aliases=["crawl"],
                           help="crawl one or more categories (in this process, at once)")
    crawl.add_argument("--category", required=True, action="append",
                       help="8-digit shop category id (repeat for several)")
    crawl.add_argument("--run-key", default=None, help="run to add to (default: a new manual run)")
    crawl.add_argument("--stats-file", type=Path, default=None,
                       help="also write the list of per-category stats JSON here "
                            "(used by crawl_categories)")
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
            per_category = runner.run_spiders(settings, args.category, run_key)
            failure = None
        except runner.CrawlError as exc:
            per_category = [{"category_id": c, "run_key": run_key, "error": str(exc)}
                            for c in args.category]
            failure = exc
        if args.stats_file:
            args.stats_file.write_text(json.dumps(per_category, ensure_ascii=False, indent=2))
        emit(per_category[0] if len(per_category) == 1
             else {"run_key": run_key, "categories": per_category})
        failed = [s for s in per_category if s.get("error")]
        if failure is None and failed:
            failure = runner.CrawlError("; ".join(f"category {s['category_id']}: {s['error']}"
                                                  for s in failed))
        if failure is not None:  # the stats (with their error) are written first, then the verdict
            return report(failure, failed=(runner.CrawlError,))
        return 0

    if args.command == "run":
        run_key = args.run_key or _default_run_key()
        try:
            runner.start_run(settings, run_key)
            from shoplens.progress import progress

            groups = runner.plan_groups(settings)
            for group in progress(groups, f"crawl {run_key}", unit="category groups"):
                runner.crawl_categories(settings, group, run_key)
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

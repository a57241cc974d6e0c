"""``python -m crawler.replica [serve] ...`` runs the replica shop; ``grocery-listing`` writes the
listing CSV that turns the grocery data set into a 6-category shop.

    python -m crawler.replica --listing listing.csv --port 8611 --faults all=0.05
    python -m crawler.replica grocery-listing --root ../shared/datasets/grocery --out listing.csv
"""
from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from pathlib import Path

SUBCOMMANDS = ("serve", "grocery-listing")


def _photo_range(raw: str) -> tuple[int, int]:
    low, _, high = raw.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN-MAX, got {raw!r}") from None


def _serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the replica shop (the default command)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--photos", type=Path, help="photos laid out DIR/<category>/<product>/*.jpg")
    source.add_argument("--listing", type=Path, help="CSV category,product,photo[,category_id]")
    p.add_argument("--port", type=int, default=8611)
    p.add_argument("--cdn-port", type=int, default=None, help="default: --port + 1")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--faults", default="", help="e.g. 500=0.05,429=0.02,hang=0.01 or all=0.1")
    p.add_argument("--bad-photos", type=float, default=0.0, metavar="FRACTION")
    p.add_argument("--hold-back", type=int, default=0, metavar="N")
    p.add_argument("--ground-truth", type=Path, default=None, metavar="PATH")
    p.add_argument("--hang-seconds", type=float, default=30.0)
    p.add_argument("--cookie-ttl", type=float, default=3600.0)
    p.add_argument("--no-waf", action="store_true",
                   help="no WAF: pages set no cookie and JSON calls need none (Referer still checked)")
    p.add_argument("--waf-challenge-page", action="store_true",
                   help="the WAF refuses a JSON call with its JS challenge page, status 200, "
                        "instead of 403 Access Denied")
    p.add_argument("--latency", type=float, default=0.0, metavar="SECONDS",
                   help="every answer (admin calls excepted) waits this long, like a remote server")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="where the generated photo set is cached (default ~/.cache/shoplens-replica)")
    p.add_argument("--synthetic-products", type=int, default=7,
                   help="generated set: learnable products per category")
    p.add_argument("--synthetic-photos", type=_photo_range, default=(6, 25), metavar="MIN-MAX",
                   help="generated set: photos per learnable product")


def _listing_parser(sub) -> None:
    p = sub.add_parser("grocery-listing", help="listing CSV of the grocery data set, 6 categories")
    p.add_argument("--root", type=Path, required=True, help="datasets/grocery folder")
    p.add_argument("--split", default="train", help="train or val")
    p.add_argument("--out", type=Path, required=True)


async def _serve(args) -> int:
    from .server import ReplicaShop

    shop = ReplicaShop(
        args.photos, args.listing, seed=args.seed, host=args.host, port=args.port,
        cdn_port=args.cdn_port, faults=args.faults, bad_photos=args.bad_photos,
        hold_back=args.hold_back, ground_truth_path=args.ground_truth,
        hang_seconds=args.hang_seconds, cookie_ttl=args.cookie_ttl, waf=not args.no_waf,
        waf_challenge_page=args.waf_challenge_page,
        cache_dir=args.cache_dir,
        synthetic_products=args.synthetic_products, synthetic_photos=args.synthetic_photos,
        latency=args.latency)
    await shop.serve()
    print(f"replica listening on {shop.base_url} (cdn {shop.cdn_url})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await shop.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in {"-h", "--help"}):
        argv = ["serve", *argv]  # plain `python -m crawler.replica --photos ...` serves
    parser = argparse.ArgumentParser(prog="python -m crawler.replica", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    _serve_parser(sub)
    _listing_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command == "grocery-listing":
            from .listings import grocery_listing, write_listing

            rows = grocery_listing(args.root, args.split)
            write_listing(rows, args.out)
            products = {(r[1], r[2]) for r in rows}
            print(f"wrote {args.out}: {len(rows)} photos, {len(products)} products, "
                  f"{len({r[1] for r in rows})} categories")
            return 0
        return asyncio.run(_serve(args))
    except (ValueError, OSError) as exc:  # bad input: one clear line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

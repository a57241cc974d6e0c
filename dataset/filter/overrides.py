"""``shoplens override``: a data engineer forces keep/reject for an image, with a reason.

The sha256 may also name a crop salvaged from a multi-product photo (``salvaged_crops``): rejecting
it keeps it out of ``kept_images`` and so out of the next dataset build.

    shoplens override SHA256 --keep --reason "two chairs but one product set"
    shoplens override SHA256 --reject --reason "shows the box, not the product"
    shoplens override SHA256 --clear
    shoplens override --list

(alias: ``python -m dataset override``)

The same can be done in SQL (``INSERT INTO image_overrides (sha256, verdict, reason) ...``). The
``image_verdicts`` view puts an override before every automatic decision, and the dataset build
reads verdicts from that view.
"""
from __future__ import annotations

import getpass
import json
import re

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from shoplens.cli import argument_parser, command, emit, parse_args
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import image_overrides, images, salvaged_crops


class OverrideError(ValueError):
    """The override cannot be recorded as asked."""


def set_override(manifest_url: str, sha256: str, verdict: str, reason: str,
                 created_by: str | None = None) -> None:
    sha256 = sha256.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise OverrideError(f"not a sha256 (64 hex digits): {sha256!r}")
    if verdict not in ("keep", "reject"):
        raise OverrideError(f"verdict must be keep or reject, got {verdict!r}")
    if not reason or not reason.strip():
        raise OverrideError("a reason is required")
    with engine_for(manifest_url).begin() as conn:
        if (conn.execute(sa.select(images.c.sha256).where(images.c.sha256 == sha256)).first() is None
                and conn.execute(sa.select(salvaged_crops.c.sha256)
                                 .where(salvaged_crops.c.sha256 == sha256)).first() is None):
            raise OverrideError(f"no image or salvaged crop {sha256} in the manifest")
        values = {"sha256": sha256, "verdict": verdict, "reason": reason.strip(),
                  "created_by": created_by or getpass.getuser()}
        conn.execute(insert(image_overrides).values(**values).on_conflict_do_update(
            index_elements=["sha256"],
            set_={**{k: v for k, v in values.items() if k != "sha256"}, "created_at": sa.func.now()}))


def clear_override(manifest_url: str, sha256: str) -> bool:
    with engine_for(manifest_url).begin() as conn:
        return conn.execute(sa.delete(image_overrides)
                            .where(image_overrides.c.sha256 == sha256.strip().lower())).rowcount > 0


@command(bad_input=(OverrideError,))
def main(argv: list[str] | None = None) -> int:
    """Force keep/reject for an image, with a reason (wins over every rule)"""
    ap = argument_parser("python -m dataset override", __doc__.split("\n\n")[0],
                         epilog=__doc__.split("\n\n", 1)[1].split("\n\n")[0])
    ap.add_argument("sha256", nargs="?")
    action = ap.add_mutually_exclusive_group(required=True)
    action.add_argument("--keep", action="store_const", const="keep", dest="verdict")
    action.add_argument("--reject", action="store_const", const="reject", dest="verdict")
    action.add_argument("--clear", action="store_true", help="remove the override")
    action.add_argument("--list", action="store_true", help="print every override (JSON lines)")
    ap.add_argument("--reason", help="why (required with --keep/--reject)")
    ap.add_argument("--by", help="who decided (default: the OS user)")
    args = parse_args(ap, argv)
    url = Settings.from_env().manifest_url
    if args.list:
        with engine_for(url).connect() as conn:
            for row in conn.execute(sa.select(image_overrides).order_by(image_overrides.c.created_at)):
                # one JSON line per override with or without --json: the listing has no text form
                emit({k: str(v) for k, v in row._mapping.items()}, lambda r: json.dumps(r, ensure_ascii=False))
        return 0
    if not args.sha256:
        ap.error("give the image's SHA256")
    if args.clear:
        removed = clear_override(url, args.sha256)
        emit({"sha256": args.sha256, "removed": removed},
             lambda r: "override removed" if r["removed"] else "no override for that image")
        return 0
    set_override(url, args.sha256, args.verdict, args.reason or "", args.by)
    emit({"sha256": args.sha256, "verdict": args.verdict, "reason": args.reason.strip()},
         lambda r: f"{r['sha256']}: {r['verdict']} ({r['reason']})")
    return 0

"""``python -m dataset <command> ...``: alias of the dataset stages' ``shoplens`` commands
(``python -m dataset dedup`` = ``shoplens dedup``, ``python -m dataset models fetch`` = ...)."""
from __future__ import annotations

from shoplens.cli import entry_points, main as shoplens_main

COMMANDS = ("dedup", "filter", "override", "models.fetch", "build", "diff", "lineage")


def main(argv: list[str] | None = None) -> int:
    points = {name: target for name, target in entry_points().items() if name in COMMANDS}
    return shoplens_main(argv, points, prog="python -m dataset")


if __name__ == "__main__":
    raise SystemExit(main())

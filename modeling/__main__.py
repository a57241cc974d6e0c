"""``python -m modeling {train,evaluate,predict,export,search,identify,serve,models,index}``:
alias of the modeling stage's ``shoplens`` commands (modeling/cli.py)."""
from __future__ import annotations

from shoplens.cli import entry_points, main as shoplens_main

COMMANDS = ("train", "evaluate", "predict", "export", "search", "identify", "serve", "models.list",
            "models.promote", "models.rollback", "index.refresh", "index.list")


def main(argv: list[str] | None = None) -> int:
    points = {name: target for name, target in entry_points().items() if name in COMMANDS}
    return shoplens_main(argv, points, prog="python -m modeling")


if __name__ == "__main__":
    raise SystemExit(main())

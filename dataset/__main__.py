"""``python -m dataset <command> ...``: the dataset stages' command line.

Each command lives in its own module, which exposes ``main(argv) -> int``.
"""
from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "dedup": ("dataset.dedup.cli", "near-duplicate clusters of image files or of the manifest"),
    "filter": ("dataset.filter.cli", "detector-assisted rules on image files or on the manifest"),
    "models": ("dataset.filter.models_fetch", "fetch the detector model file (models fetch)"),
    "override": ("dataset.filter.overrides", "force keep/reject for an image, with a reason"),
    "build": ("dataset.build.cli", "build a new dataset version from the manifest"),
    "diff": ("dataset.build.diff", "compare two dataset versions"),
    "lineage": ("shoplens.lineage", "where an image of a version came from and where it went"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"} or argv[0] not in COMMANDS:
        print("usage: python -m dataset <command> [options]\n\ncommands:")
        for name, (_, help_text) in COMMANDS.items():
            print(f"  {name:<9} {help_text}")
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

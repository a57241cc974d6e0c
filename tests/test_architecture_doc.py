"""docs/architecture.md is the map of the codebase: one line per module saying its single job.
A module added without its line, or a line left behind by a module that moved, fails here."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CODE_DIRS = ("shoplens", "crawler", "dataset", "modeling", "dags", "plugins", "benchmarks")
DOC = REPO / "docs" / "architecture.md"


def modules() -> list[str]:
    """Every Python module of the project but package markers and Alembic revisions (the
    migrations folder has its own line naming the chain)."""
    out = []
    for top in CODE_DIRS:
        for path in (REPO / top).rglob("*.py"):
            rel = path.relative_to(REPO).as_posix()
            if path.name == "__init__.py" or "/migrations/versions/" in rel or "__pycache__" in rel:
                continue
            out.append(rel)
    return sorted(out)


def named_paths(text: str) -> set[str]:
    """Backticked repository paths of Python files (a directory prefix, so not a bare name)."""
    return {m for m in re.findall(r"`([\w./-]+\.py)`", text) if "/" in m}


def test_every_module_has_its_line_in_the_architecture_doc():
    text = DOC.read_text()
    missing = [m for m in modules() if f"`{m}`" not in text]
    assert not missing, f"add a line to docs/architecture.md for: {missing}"


def test_every_module_the_architecture_doc_names_exists():
    stale = sorted(p for p in named_paths(DOC.read_text()) if not (REPO / p).is_file())
    assert not stale, f"docs/architecture.md names modules that are gone: {stale}"


def test_the_checks_see_a_missing_line_and_a_stale_one():
    assert "`shoplens/config.py`" in DOC.read_text()  # the reader finds what is there
    assert named_paths("- `crawler/gone.py`: x\n- `crawl.py` is a bare name\n") == {"crawler/gone.py"}
    assert "shoplens/config.py" in modules() and not any(m.endswith("__init__.py") for m in modules())

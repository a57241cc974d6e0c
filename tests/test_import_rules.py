"""The import rule of the codebase, checked over the real import graph of every module.

Stage packages import only the ``shoplens`` core (never each other, never the dev harness), the core
imports no stage, and no crawler module imports the replica shop that stands in for the real one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGES = ("crawler", "dataset.dedup", "dataset.filter", "dataset.build", "modeling", "shoplens_ui")
STAGE_ROOTS = {"crawler", "dataset", "modeling", "shoplens_ui"}


def module_name(path: Path, root: Path = REPO) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins":
        parts = parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path, root: Path = REPO) -> set[str]:
    """Every module a file imports, at top level or inside functions, as absolute dotted names."""
    found: set[str] = set()
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def owner(module: str) -> str | None:
    """The stage (or 'core' / 'dev') a dotted module name belongs to; None for third-party code."""
    if module == "shoplens.dev" or module.startswith("shoplens.dev."):
        return "dev"
    if module == "shoplens" or module.startswith("shoplens."):
        return "core"
    for stage in sorted(STAGES, key=len, reverse=True):
        if module == stage or module.startswith(stage + "."):
            return stage
    return "dataset" if module == "dataset" or module.startswith("dataset.") else None


def source_files(*tops: str) -> list[Path]:
    files = []
    for top in tops:
        files += [p for p in (REPO / top).rglob("*.py") if "migrations" not in p.parts]
    return sorted(files)


def test_owner_classifies_the_packages():
    assert owner("shoplens.manifest.schema") == "core"
    assert owner("shoplens.dev.services") == "dev"
    assert owner("dataset.filter.rules") == "dataset.filter"
    assert owner("crawler.replica.app") == "crawler"
    assert owner("numpy") is None


@pytest.mark.parametrize("path", source_files("crawler", "dataset", "modeling", "plugins/shoplens_ui"),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_a_stage_imports_only_itself_and_the_core(path):
    me = owner(module_name(path))
    wrong = sorted(m for m in imported_modules(path)
                   if owner(m) not in (None, "core", me) and m != "dataset")
    assert not wrong, f"{path.relative_to(REPO)} ({me}) imports {wrong}"


@pytest.mark.parametrize("path", source_files("shoplens"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_core_imports_no_stage(path):
    allowed = {"core", "dev", None} if owner(module_name(path)) == "dev" else {"core", None}
    wrong = sorted(m for m in imported_modules(path) if owner(m) not in allowed)
    assert not wrong, f"{path.relative_to(REPO)} imports {wrong}"


@pytest.mark.parametrize("path", [p for p in source_files("crawler") if "replica" not in p.parts],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_no_crawler_module_imports_the_replica(path):
    wrong = sorted(m for m in imported_modules(path) if m.startswith("crawler.replica"))
    assert not wrong, f"{path.relative_to(REPO)} imports the replica: {wrong}"


def test_the_checker_reports_a_stage_importing_another_stage(tmp_path):
    probe = tmp_path / "dataset" / "filter" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from dataset.build import stage\nfrom ..dedup import hashing\n")
    me = owner(module_name(probe, tmp_path))
    wrong = sorted(m for m in imported_modules(probe, tmp_path) if owner(m) not in (None, "core", me))
    assert wrong == ["dataset.build", "dataset.build.stage", "dataset.dedup", "dataset.dedup.hashing"]

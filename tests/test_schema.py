"""The one schema: ``shoplens.manifest.schema`` describes exactly what the migrations create.

Alembic's own compare (the engine behind ``alembic revision --autogenerate``) runs against a
freshly migrated manifest with type and server-default comparison on; any difference is drift
between the migrations and the table objects every stage reads and writes through.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shoplens.manifest import ManifestNotMigrated, engine_for, require_migrated, upgrade
from shoplens.manifest.db import head_revision
from shoplens.manifest.schema import metadata, views

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("shoplens", "crawler", "dataset", "modeling", "plugins", "dags", "benchmarks")
SCHEMA_MODULE = REPO / "shoplens" / "manifest" / "schema.py"


def drift(conn: sa.Connection) -> list:
    """Alembic's list of differences between the database and ``metadata`` (empty: none)."""
    context = MigrationContext.configure(
        conn, opts={"compare_type": True, "compare_server_default": True})
    return compare_metadata(context, metadata)


def operations(diffs: list) -> set[str]:
    """The operation names of a compare result (a column change comes as a list of tuples)."""
    return {(d[0] if isinstance(d, tuple) else d[0][0]) for d in diffs}


def test_the_migrated_manifest_matches_the_schema_metadata(manifest_url):
    """Every table, column, type, nullability, server default, index, unique and foreign key
    that the migration chain creates is declared in the one MetaData, and nothing more."""
    with engine_for(manifest_url).connect() as conn:
        assert drift(conn) == []


# Each changes the migrated database in one way a migration could drift from the schema module;
# the compare must report it, or the test above could pass over real drift.
DRIFTS = {
    "a dropped column": ("ALTER TABLE reviews DROP COLUMN writer_nickname", "add_column"),
    "a changed type": ("ALTER TABLE run_metrics ALTER COLUMN duration_seconds TYPE real",
                       "modify_type"),
    "a changed server default": ("ALTER TABLE crawl_runs ALTER COLUMN status SET DEFAULT 'done'",
                                 "modify_default"),
    "a changed nullability": ("ALTER TABLE reviews ALTER COLUMN comment SET NOT NULL",
                              "modify_nullable"),
    "a dropped index": ("DROP INDEX images_run", "add_index"),
    "a dropped unique constraint": (
        "ALTER TABLE crawl_runs DROP CONSTRAINT crawl_runs_run_key_key", "add_constraint"),
    "a foreign key without its ON DELETE": (
        "ALTER TABLE model_metrics DROP CONSTRAINT model_metrics_model_id_fkey;"
        " ALTER TABLE model_metrics ADD FOREIGN KEY (model_id) REFERENCES models (id)", "add_fk"),
    "a table the schema does not declare": ("CREATE TABLE stray (id integer)", "remove_table"),
}


@pytest.mark.parametrize("change", DRIFTS, ids=list(DRIFTS))
def test_the_compare_reports_drift(manifest_url, change):
    """A migration that drifts from the schema module is caught, whatever the kind of drift."""
    ddl, expected = DRIFTS[change]
    with engine_for(manifest_url).connect() as conn:
        with conn.begin() as transaction:  # PostgreSQL DDL is transactional: undone below
            conn.exec_driver_sql(ddl)
            found = operations(drift(conn))
            transaction.rollback()
    assert expected in found, f"{change}: compare found only {sorted(found)}"


def test_declared_views_have_the_columns_the_migrations_give_them(manifest_url):
    """Views read as table objects name only columns their CREATE VIEW produces."""
    inspector = sa.inspect(engine_for(manifest_url))
    existing = set(inspector.get_view_names())
    for view in views.tables.values():
        assert view.name in existing, f"{view.name} is declared but no migration creates it"
        actual = [c["name"] for c in inspector.get_columns(view.name)]
        assert [c.name for c in view.columns] == actual, view.name


def test_views_are_not_mistaken_for_tables():
    assert not set(views.tables) & set(metadata.tables)


def test_a_manifest_at_the_head_migration_passes_the_one_readiness_check(manifest_url):
    with engine_for(manifest_url).connect() as conn:
        require_migrated(conn)  # raises when not ready


def test_a_manifest_never_migrated_or_behind_the_code_is_named_not_ready(fresh_database):
    """The one "does the schema exist" check: it says which migration the manifest is at and how
    to fix it, never silently degrades."""
    with engine_for(fresh_database).connect() as conn:
        with pytest.raises(ManifestNotMigrated, match="none \\(never migrated\\).*apply the migrations"):
            require_migrated(conn)
    upgrade(fresh_database, "0003_filter")
    with engine_for(fresh_database).connect() as conn:
        with pytest.raises(ManifestNotMigrated, match=f"at migration 0003_filter, this code needs {head_revision()}"):
            require_migrated(conn)


def _declares_schema(path: Path) -> list[str]:
    """``Table(...)`` / ``MetaData(...)`` calls in a source file, as 'path:line'."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", None) or getattr(node.func, "id", None)
            if name in ("Table", "MetaData"):
                found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def test_no_module_but_the_schema_declares_manifest_tables():
    """One copy of the schema: stages import the tables, they never declare their own."""
    elsewhere = [hit for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))
                 if path != SCHEMA_MODULE and "migrations" not in path.parts
                 for hit in _declares_schema(path)]
    assert elsewhere == []

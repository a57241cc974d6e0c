"""Connecting to the manifest and bringing its schema up to date with Alembic."""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import make_url

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


@functools.lru_cache(maxsize=16)
def engine_for(url: str) -> sa.Engine:
    # pool_pre_ping: a nightly run outlives database restarts; stale connections must not fail it.
    return sa.create_engine(url, pool_pre_ping=True, future=True)


def ensure_database(url: str) -> None:
    """Create the manifest database if the server does not have it yet (idempotent)."""
    target = make_url(url)
    admin = target.set(database="postgres")
    eng = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with eng.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": target.database}
            ).scalar()
            if not exists:
                conn.execute(sa.text(f'CREATE DATABASE "{target.database}"'))
    finally:
        eng.dispose()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Create the database if needed and apply every migration up to ``revision``."""
    from alembic import command

    ensure_database(url)
    command.upgrade(alembic_config(url), revision)


class ManifestNotMigrated(RuntimeError):
    """The manifest is not at the migration chain's head, so tables this code reads may be absent."""


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The last revision of the migration chain shipped with this code."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("")).get_current_head()


def require_migrated(conn: sa.Connection) -> None:
    """Raise :class:`ManifestNotMigrated` unless every migration has been applied.

    The chain is linear and ``upgrade`` always goes to its head, so a migrated manifest has every
    table of every stage: this is the one "does the schema exist" check, made once, instead of
    asking table by table.
    """
    current = revision_of(conn)
    if current != head_revision():
        raise ManifestNotMigrated(
            f"the manifest is at migration {current or 'none (never migrated)'}, this code needs "
            f"{head_revision()}: apply the migrations (shoplens.manifest.upgrade, or the image's "
            "`init` command)")


def revision_of(conn: sa.Connection) -> str | None:
    """The manifest's migration revision; None when no migration has run on it."""
    from alembic.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def current_revision(url: str) -> str | None:
    with engine_for(url).connect() as conn:
        return revision_of(conn)


@contextlib.contextmanager
def session_scope(url: str) -> Iterator[sa.Connection]:
    """One transaction: committed when the block ends, rolled back on any exception."""
    with engine_for(url).begin() as conn:
        yield conn

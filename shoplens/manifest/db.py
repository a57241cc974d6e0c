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


def current_revision(url: str) -> str | None:
    with engine_for(url).connect() as conn:
        try:
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
        except sa.exc.ProgrammingError:
            return None


@contextlib.contextmanager
def session_scope(url: str) -> Iterator[sa.Connection]:
    """One transaction: committed when the block ends, rolled back on any exception."""
    with engine_for(url).begin() as conn:
        yield conn

"""Shared fixtures: a real PostgreSQL manifest database and a real S3 server (SeaweedFS).

Each test that asks for ``manifest_url`` gets a freshly created, migrated database of its own;
``s3_settings`` gives a fresh bucket in one SeaweedFS started for the whole session.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from shoplens.config import Settings
from shoplens.dev.services import SeaweedFS

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHOPLENS_SHARED_DIR", REPO.parent / "shared"))
PG_SERVER = os.environ.get("SHOPLENS_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")


@pytest.fixture(autouse=True, scope="session")
def _no_writes_to_the_users_cache(tmp_path_factory):
    """The default search cache (indexes, the frozen query network) is a session folder, so no
    test writes into ~/.cache; a test whose settings name a cache folder uses that one."""
    name = "SHOPLENS_SEARCH_CACHE_DIR"
    if name in os.environ:
        yield
        return
    os.environ[name] = str(tmp_path_factory.mktemp("search-cache"))
    try:
        yield
    finally:
        os.environ.pop(name, None)


def pytest_collection_modifyitems(items):
    """Files that start a real Airflow stack run first, so that under ``make test``'s workers
    (``--dist loadfile``) the two longest files start at once on different workers instead of
    ending the run alone; the order within a file is kept."""
    starts_airflow = {item.path for item in items if item.get_closest_marker("e2e")}
    items.sort(key=lambda item: item.path not in starts_airflow)


def xdist_worker_number() -> int:
    """0, 1, ... for pytest-xdist's workers gw0, gw1, ...; 0 without xdist."""
    return int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or a skip that says in one line that it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs ../shared/{'/'.join(parts)} (absent on this machine)")
    return path


def count_keras_builds(monkeypatch) -> list:
    """From now on, each Keras network an Embedder builds appends its backbone to the list."""
    from shoplens.vision.embedding import Embedder

    built = []
    real = Embedder.model.fget

    def counting(self):
        if self._model is None:
            built.append(self.backbone)
        return real(self)

    monkeypatch.setattr(Embedder, "model", property(counting))
    return built


def _admin_engine():
    return sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")


def _new_database():
    """URL of a new empty database, dropped when the generator is closed."""
    name = f"shoplens_test_{uuid.uuid4().hex[:10]}"
    eng = _admin_engine()
    with eng.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = f"{PG_SERVER}/{name}"
    yield url
    from shoplens.manifest.db import engine_for

    engine_for.cache_clear()
    with eng.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


@pytest.fixture
def fresh_database():
    """URL of a new empty database; dropped after the test. It is also the database behind
    ``manifest_url`` (and ``replica_settings``) when a test asks for those."""
    yield from _new_database()


@pytest.fixture
def other_database():
    """URL of a second new empty database, never the one behind ``manifest_url`` (e.g. for a
    reference run to compare a manifest with); dropped after the test."""
    yield from _new_database()


@pytest.fixture
def manifest_url(fresh_database):
    """A fresh database with every manifest migration applied."""
    from shoplens.manifest import upgrade

    upgrade(fresh_database)
    return fresh_database


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory):
    weed = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"), 0,
                     "test-access", "test-secret-key")
    weed.start()
    yield weed
    weed.stop()


@pytest.fixture
def s3_settings(seaweedfs):
    """Settings pointing at the session's SeaweedFS with a fresh, created bucket."""
    from shoplens.store import ObjectStore

    settings = Settings().with_overrides(
        s3_endpoint=seaweedfs.endpoint, s3_access_key=seaweedfs.access_key,
        s3_secret_key=seaweedfs.secret_key, s3_bucket=f"t-{uuid.uuid4().hex[:12]}")
    ObjectStore(settings).ensure_bucket()
    return settings


@pytest.fixture
def small_replica():
    """A small generated replica shop (6 categories x 4 products, 3-6 photos each)."""
    from crawler.replica import ReplicaShop

    shop = ReplicaShop(seed=11, synthetic_products=4, synthetic_photos=(3, 6))
    shop.start()
    yield shop
    shop.stop()


@pytest.fixture
def replica_settings(manifest_url, s3_settings, small_replica):
    """Settings that crawl ``small_replica`` into a fresh manifest and bucket, without delays."""
    cdn_host = small_replica.cdn_url.split("://", 1)[1]
    return s3_settings.with_overrides(manifest_url=manifest_url, shop_base_url=small_replica.base_url,
                                      allowed_hosts=[cdn_host], download_delay=0.0,
                                      concurrent_per_host=4)

"""Helpers for end-to-end tests that run the real Airflow stack against the replica shop."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import sqlalchemy as sa

from shoplens.dev.airflow_stack import AirflowStack
from shoplens.config import Settings
from shoplens.dev.services import free_port_block
from tests.conftest import xdist_worker_number

PG_SERVER = os.environ.get("SHOPLENS_TEST_PG", "postgresql+psycopg2://postgres@127.0.0.1:5432")


def stack_for(home: Path, settings: Settings, model_path: Path | None) -> AirflowStack:
    """An Airflow stack whose workers crawl with ``settings`` (SHOPLENS_* environment)."""
    env = {
        "SHOPLENS_MANIFEST_URL": settings.manifest_url,
        "SHOPLENS_S3_ENDPOINT": settings.s3_endpoint,
        "SHOPLENS_S3_ACCESS_KEY": settings.s3_access_key,
        "SHOPLENS_S3_SECRET_KEY": settings.s3_secret_key,
        "SHOPLENS_S3_BUCKET": settings.s3_bucket,
        "SHOPLENS_SHOP_BASE_URL": settings.shop_base_url,
        "SHOPLENS_ALLOWED_HOSTS": ",".join(settings.allowed_hosts),
        "SHOPLENS_DOWNLOAD_DELAY": str(settings.download_delay),
        "SHOPLENS_CONCURRENT_PER_HOST": str(settings.concurrent_per_host),
        "SHOPLENS_DATASET_MIN_PHOTOS_PER_PRODUCT": "1",
        # Dead workers are noticed quickly in tests; production keeps Airflow's defaults. A task
        # a killed worker had taken but not started stays "queued": it is re-queued after
        # task_queued_timeout, and Redis hands its message out again after the visibility timeout.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "60",
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT_CHECK_INTERVAL": "15",
        "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT": "300",
        # A task failed or killed is retried after 2-3 s instead of 20-40 s.
        "SHOPLENS_TASK_RETRY_DELAY": "2",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
        # Only the runs a test triggers: unpausing a scheduled DAG would also start last night's run.
        "SHOPLENS_NIGHTLY_SCHEDULE": "",
    }
    if model_path is not None:
        env["SHOPLENS_DETECTOR_MODEL_PATH"] = str(model_path)
    db = f"{PG_SERVER}/airflow_test_{uuid.uuid4().hex[:8]}"
    return AirflowStack(home=home, db_url=db, api_port=free_port_block(1),
                        broker_url=broker_for_this_test_process(), extra_env=env)


def broker_for_this_test_process() -> str:
    """A Redis database for this test process's Celery messages: under pytest-xdist one per
    worker, so that stacks started by parallel workers never take each other's tasks."""
    if "PYTEST_XDIST_WORKER" in os.environ:
        return f"redis://127.0.0.1:6379/{7 + xdist_worker_number() % 9}"
    return f"redis://127.0.0.1:6379/{7 + uuid.uuid4().int % 9}"


def drop_database(url: str) -> None:
    name = sa.engine.make_url(url).database
    eng = sa.create_engine(f"{PG_SERVER}/postgres", isolation_level="AUTOCOMMIT")
    with eng.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    eng.dispose()


def expected_photo_reviews(ground_truth: dict, categories: list[str], best_n: int) -> set[int]:
    """Review ids whose photo an exact crawl of best-N per category must store."""
    best = {pid for c in ground_truth["categories"] if c["id"] in categories
            for pid in c["product_ids_by_rank"][:best_n]}
    return {r["id"] for r in ground_truth["reviews"]
            if r["product_id"] in best and r["photo_id"] and not r.get("bad")}


def manifest_snapshot(url: str) -> dict[str, set]:
    """Manifest contents without run ids and timestamps, to compare two crawls of the same shop."""
    queries = {
        "products": "SELECT id, category_id, name, brand, price, rank, review_count FROM products",
        "reviews": "SELECT id, product_id, created_date, stars, comment, photo_url FROM reviews",
        "images": "SELECT sha256, object_key, size_bytes, width, height, format, review_id FROM images",
        "review_photos": "SELECT review_id, sha256 FROM review_photos",
    }
    eng = sa.create_engine(url)
    try:
        with eng.connect() as conn:
            return {name: {tuple(row) for row in conn.execute(sa.text(q))} for name, q in queries.items()}
    finally:
        eng.dispose()

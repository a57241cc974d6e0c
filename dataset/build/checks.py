"""Data-quality checks of a dataset version, declared once and run by Airflow's SQL check operators.

The checks are plain ``checks`` / ``column_mapping`` dicts in the shape of
``airflow.providers.common.sql``'s ``SQLTableCheckOperator`` and ``SQLColumnCheckOperator``,
restricted to one version by a ``partition_clause``. The same definitions serve twice:

- :func:`check_operators` builds the operators for a DAG (against an Airflow connection to the
  manifest, with the version id templated in), and
- :func:`run_sql_checks` executes those very operators from :func:`dataset.build.stage.run`, against
  ``settings.manifest_url``, so that every build is checked whether or not it runs in Airflow.

Table checks are aggregates, so each yields exactly one row even for an empty version. The one
check that SQL cannot express, "every member's object exists in the object store", is
:func:`missing_objects` (a listing per key prefix through the minio client).
"""
from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import make_url

from shoplens.config import Settings

VERSION_ID = re.compile(r"^v[0-9]{4,}$")
# Airflow connection that build.run points at settings.manifest_url while it runs the checks.
BUILD_CHECKS_CONN_ID = "shoplens_dataset_build_checks"


class DataQualityError(RuntimeError):
    """A dataset version failed one or more data-quality checks."""


def _not_in(subquery: str) -> str:
    """Aggregate statement: no member of the partition lacks a matching row in ``subquery``."""
    return (f"COALESCE(SUM(CASE WHEN EXISTS ({subquery}) THEN 0 ELSE 1 END), 0) = 0")


def table_checks(settings: Settings) -> dict[str, dict[str, dict[str, str]]]:
    """``{table: checks}`` for SQLTableCheckOperator; partition by ``version_id`` when run."""
    members = "dataset_members"
    return {
        "dataset_members": {
            "version_has_images": {"check_statement": "COUNT(*) > 0"},
            "train_split_not_empty": {"check_statement": "COUNT(*) FILTER (WHERE split = 'train') > 0"},
            "val_split_not_empty": {"check_statement": "COUNT(*) FILTER (WHERE split = 'val') > 0"},
            "test_split_not_empty": {"check_statement": "COUNT(*) FILTER (WHERE split = 'test') > 0"},
            "every_label_has_a_train_photo": {"check_statement":
                "COUNT(DISTINCT label) = COUNT(DISTINCT label) FILTER (WHERE split = 'train')"},
            # Split leakage: a near-duplicate cluster in two splits has two (cluster, split) pairs.
            "no_cluster_spans_two_splits": {"check_statement":
                "COUNT(DISTINCT cluster_id) = COUNT(DISTINCT cluster_id || '/' || split)"},
            "every_member_has_its_image_row": {"check_statement": _not_in(
                f"SELECT 1 FROM images i WHERE i.sha256 = {members}.sha256"
                f" AND i.object_key = {members}.object_key")},
            "every_label_is_the_products_stable_label": {"check_statement": _not_in(
                f"SELECT 1 FROM label_map l WHERE l.label = {members}.label"
                f" AND l.product_id = {members}.product_id")},
        },
        "dataset_version_label_counts": {
            "products_meet_min_photos": {"check_statement":
                f"COUNT(*) FILTER (WHERE images < {int(settings.dataset_min_photos_per_product)}) = 0"},
            "products_within_max_photos": {"check_statement":
                f"COUNT(*) FILTER (WHERE images > {int(settings.dataset_max_photos_per_product)}) = 0"},
            "one_label_per_product": {"check_statement":
                "COUNT(*) = COUNT(DISTINCT label) AND COUNT(*) = COUNT(DISTINCT product_id)"},
        },
    }


# Checks that only hold while the version is being built (the manifest moves on afterwards).
BUILD_TIME_TABLE_CHECKS = {
    "dataset_members": {
        "members_are_kept_images": {"check_statement": _not_in(
            "SELECT 1 FROM kept_images k WHERE k.sha256 = dataset_members.sha256")},
    },
}

COLUMN_CHECKS: dict[str, dict[str, dict[str, dict[str, Any]]]] = {
    "dataset_members": {
        "sha256": {"null_check": {"equal_to": 0}, "unique_check": {"equal_to": 0}},
        "object_key": {"null_check": {"equal_to": 0}, "unique_check": {"equal_to": 0}},
        "label": {"null_check": {"equal_to": 0}, "min": {"geq_to": 0}},
        "split": {"null_check": {"equal_to": 0}, "distinct_check": {"equal_to": 3}},
        "cluster_id": {"null_check": {"equal_to": 0}},
    },
}


def partition_for(version_id: str) -> str:
    if not VERSION_ID.match(version_id):
        raise ValueError(f"not a dataset version id: {version_id!r} (expected e.g. v0001)")
    return f"version_id = '{version_id}'"


def check_operators(settings: Settings, conn_id: str, partition_clause: str,
                    include_build_time: bool = False, task_id_prefix: str = "dataset_check") -> list:
    """SQL check operators for one version; call inside a DAG context to add them as tasks.

    ``partition_clause`` is a template field, so a DAG can pass
    ``"version_id = '{{ ti.xcom_pull(task_ids='build_dataset')['version_id'] }}'"``.
    """
    from airflow.providers.common.sql.operators.sql import (
        SQLColumnCheckOperator, SQLTableCheckOperator)

    tables = {table: dict(checks) for table, checks in table_checks(settings).items()}
    if include_build_time:
        for table, checks in BUILD_TIME_TABLE_CHECKS.items():
            tables.setdefault(table, {}).update(checks)
    operators = []
    for table, checks in tables.items():
        operators.append(SQLTableCheckOperator(
            task_id=f"{task_id_prefix}_{table}", conn_id=conn_id, table=table,
            checks={name: dict(spec) for name, spec in checks.items()},
            partition_clause=partition_clause, retry_on_failure=False))
    for table, mapping in COLUMN_CHECKS.items():
        operators.append(SQLColumnCheckOperator(
            task_id=f"{task_id_prefix}_{table}_columns", conn_id=conn_id, table=table,
            column_mapping={col: {chk: dict(v) for chk, v in checks.items()}
                            for col, checks in mapping.items()},
            partition_clause=partition_clause, retry_on_failure=False))
    return operators


@dataclass(frozen=True)
class CheckResult:
    table: str
    name: str
    passed: bool
    actual: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "check": self.name, "passed": self.passed,
                "actual": self.actual}


def run_sql_checks(settings: Settings, version_id: str) -> list[CheckResult]:
    """Execute the check operators for ``version_id`` against ``settings.manifest_url``.

    Returns every check's result; raising is left to the caller so that one report lists all
    failures rather than the first one.
    """
    results: list[CheckResult] = []
    # A fresh id per call: no cached connection from another manifest can be picked up.
    conn_id = f"{BUILD_CHECKS_CONN_ID}_{uuid.uuid4().hex[:8]}"
    with _airflow_connection(conn_id, settings.manifest_url):
        for operator in check_operators(settings, conn_id, partition_for(version_id),
                                        include_build_time=True):
            try:
                operator.execute(context={})
            except Exception as exc:  # the operator has recorded per-check results before raising
                if not operator.check_results:
                    raise DataQualityError(f"{operator.task_id} could not run: {exc}") from exc
            for r in operator.check_results:
                results.append(CheckResult(table=r.table or operator.table, name=r.name,
                                           passed=bool(r.success), actual=r.actual))
    return results


@contextlib.contextmanager
def _airflow_connection(conn_id: str, sqlalchemy_url: str) -> Iterator[None]:
    """Define an Airflow connection for the block through Airflow's AIRFLOW_CONN_* mechanism."""
    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    name = f"AIRFLOW_CONN_{conn_id.upper()}"
    old = os.environ.get(name)
    os.environ[name] = url.render_as_string(hide_password=False)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def missing_objects(settings: Settings, version_id: str) -> list[str]:
    """Object keys of the version's members that the object store does not hold."""
    from shoplens.manifest import engine_for
    from shoplens.store import ObjectStore

    with engine_for(settings.manifest_url).connect() as conn:
        keys = conn.execute(sa.text(
            "SELECT object_key FROM dataset_members WHERE version_id = :v"),
            {"v": version_id}).scalars().all()
    by_folder: dict[str, set[str]] = defaultdict(set)
    for key in keys:
        by_folder[key.rsplit("/", 1)[0] + "/" if "/" in key else ""].add(key)
    store = ObjectStore(settings)
    missing: list[str] = []
    for folder, wanted in sorted(by_folder.items()):
        present = set(store.list_keys(folder)) if folder else {k for k in wanted if store.exists(k)}
        missing.extend(sorted(wanted - present))
    return missing

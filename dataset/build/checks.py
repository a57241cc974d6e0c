"""Data-quality checks of a dataset version: plain SQL aggregates, run by the build stage.

Each :class:`Check` is one boolean aggregate over one table's rows of a version (``version_id =
:v``, bound as a parameter) and the aggregate that shows what was found, so a failing check
says e.g. ``dataset_members.every_label_has_a_train_photo (got labels 4, with a train photo 3)``.
Aggregates yield exactly one row even for an empty version. :func:`run_sql_checks` runs every
check of a version (one query per table) and returns all results; the build stage
(:func:`dataset.build.stage.run`) raises :class:`DataQualityError` listing every failure, and
``python -m dataset build --check V`` prints them. The one check that SQL cannot express,
"every member's object exists in the object store", is :func:`missing_objects` (a listing per
key prefix through the minio client).
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from shoplens.config import Settings
from shoplens.manifest import engine_for

VERSION_ID = re.compile(r"^v[0-9]{4,}$")


class DataQualityError(RuntimeError):
    """A dataset version failed one or more data-quality checks."""


@dataclass(frozen=True)
class Check:
    table: str  # a table or view with a version_id column
    name: str
    passes: str  # SQL boolean aggregate over the version's rows of ``table``
    found: str  # SQL aggregate (text) showing what was found, for the failure message
    build_time_only: bool = False  # holds while the version is built; the manifest moves on


def _every_member_has(subquery: str, what: str) -> tuple[str, str]:
    """(passes, found): no member of the version lacks a matching row in ``subquery``."""
    lacking = f"COALESCE(SUM(CASE WHEN EXISTS ({subquery}) THEN 0 ELSE 1 END), 0)"
    return f"{lacking} = 0", f"{lacking} || ' member(s) without {what}'"


def _null_free(column: str) -> Check:
    return Check("dataset_members", f"{column}_not_null",
                 f"COUNT(*) FILTER (WHERE {column} IS NULL) = 0",
                 f"COUNT(*) FILTER (WHERE {column} IS NULL) || ' null(s)'")


def _unique(column: str) -> Check:
    return Check("dataset_members", f"{column}_unique",
                 f"COUNT({column}) = COUNT(DISTINCT {column})",
                 f"COUNT({column}) - COUNT(DISTINCT {column}) || ' repeated value(s)'")


def checks_for(settings: Settings) -> list[Check]:
    """Every check, in the order they are reported."""
    min_photos = int(settings.dataset_min_photos_per_product)
    max_photos = int(settings.dataset_max_photos_per_product)
    return [
        Check("dataset_members", "version_has_images", "COUNT(*) > 0", "COUNT(*) || ' images'"),
        *[Check("dataset_members", f"{split}_split_not_empty",
                f"COUNT(*) FILTER (WHERE split = '{split}') > 0",
                f"COUNT(*) FILTER (WHERE split = '{split}') || ' {split} images'")
          for split in ("train", "val", "test")],
        Check("dataset_members", "every_label_has_a_train_photo",
              "COUNT(DISTINCT label) = COUNT(DISTINCT label) FILTER (WHERE split = 'train')",
              "'labels ' || COUNT(DISTINCT label) || ', with a train photo ' "
              "|| COUNT(DISTINCT label) FILTER (WHERE split = 'train')"),
        # Split leakage: a near-duplicate cluster in two splits has two (cluster, split) pairs.
        Check("dataset_members", "no_cluster_spans_two_splits",
              "COUNT(DISTINCT cluster_id) = COUNT(DISTINCT cluster_id || '/' || split)",
              "COUNT(DISTINCT cluster_id || '/' || split) - COUNT(DISTINCT cluster_id) "
              "|| ' cluster(s) in a second split'"),
        # A member is a crawled photo or a crop salvaged from one (migration 0009_salvage).
        Check("dataset_members", "every_member_has_its_image_row", *_every_member_has(
            "SELECT 1 FROM images i WHERE i.sha256 = dataset_members.sha256"
            " AND i.object_key = dataset_members.object_key UNION ALL"
            " SELECT 1 FROM salvaged_crops c WHERE c.sha256 = dataset_members.sha256"
            " AND c.object_key = dataset_members.object_key", "its images (or salvaged crop) row")),
        Check("dataset_members", "every_label_is_the_products_stable_label", *_every_member_has(
            "SELECT 1 FROM label_map l WHERE l.label = dataset_members.label"
            " AND l.product_id = dataset_members.product_id", "the product label")),
        Check("dataset_members", "members_are_kept_images", *_every_member_has(
            "SELECT 1 FROM kept_images k WHERE k.sha256 = dataset_members.sha256",
            "a kept image"), build_time_only=True),
        _null_free("sha256"), _unique("sha256"),
        _null_free("object_key"), _unique("object_key"),
        _null_free("label"),
        Check("dataset_members", "label_not_negative", "COALESCE(MIN(label) >= 0, TRUE)",
              "'smallest label ' || COALESCE(MIN(label)::text, 'none')"),
        _null_free("split"),
        Check("dataset_members", "split_has_three_values", "COUNT(DISTINCT split) = 3",
              "COUNT(DISTINCT split) || ' distinct split(s)'"),
        _null_free("cluster_id"),
        Check("dataset_version_label_counts", "products_meet_min_photos",
              f"COUNT(*) FILTER (WHERE images < {min_photos}) = 0",
              f"COUNT(*) FILTER (WHERE images < {min_photos}) || ' product(s) under {min_photos}'"),
        Check("dataset_version_label_counts", "products_within_max_photos",
              f"COUNT(*) FILTER (WHERE images > {max_photos}) = 0",
              f"COUNT(*) FILTER (WHERE images > {max_photos}) || ' product(s) over {max_photos}'"),
        Check("dataset_version_label_counts", "one_label_per_product",
              "COUNT(*) = COUNT(DISTINCT label) AND COUNT(*) = COUNT(DISTINCT product_id)",
              "COUNT(*) || ' rows, ' || COUNT(DISTINCT label) || ' labels, ' "
              "|| COUNT(DISTINCT product_id) || ' products'"),
    ]


def validate_version_id(version_id: str) -> str:
    if not VERSION_ID.match(version_id):
        raise ValueError(f"not a dataset version id: {version_id!r} (expected e.g. v0001)")
    return version_id


@dataclass(frozen=True)
class CheckResult:
    table: str
    name: str
    passed: bool
    actual: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"table": self.table, "check": self.name, "passed": self.passed,
                "actual": self.actual}


def run_sql_checks(settings: Settings, version_id: str,
                   include_build_time: bool = True) -> list[CheckResult]:
    """Run every check on ``version_id`` against ``settings.manifest_url``.

    Returns every check's result; raising is left to the caller so that one report lists all
    failures rather than the first one. A manifest that cannot run them raises its own error
    (a retry may help; a failed check would fail the same way again).
    """
    validate_version_id(version_id)
    by_table: dict[str, list[Check]] = defaultdict(list)
    for check in checks_for(settings):
        if include_build_time or not check.build_time_only:
            by_table[check.table].append(check)
    results: list[CheckResult] = []
    with engine_for(settings.manifest_url).connect() as conn:
        for table, table_checks in by_table.items():
            columns = ", ".join(f"({c.passes}) AS ok_{i}, ({c.found})::text AS found_{i}"
                                for i, c in enumerate(table_checks))
            row = conn.execute(sa.text(f"SELECT {columns} FROM {table} WHERE version_id = :v"),
                               {"v": version_id}).mappings().one()
            results += [CheckResult(table, c.name, bool(row[f"ok_{i}"]), row[f"found_{i}"])
                        for i, c in enumerate(table_checks)]
    return results


def missing_objects(settings: Settings, version_id: str) -> list[str]:
    """Object keys of the version's members that the object store does not hold."""
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

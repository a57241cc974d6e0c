"""Build an immutable, labelled dataset version from the manifest's kept images.

``run(settings, run_key)`` is the stage entry. One build:

1. reads the kept images (``kept_images``: not duplicates; passing the rules or force-kept),
2. selects products and photos (:mod:`dataset.build.selection`), labels them with the stable label map
   (:mod:`dataset.build.labels`) and splits them (:mod:`dataset.build.splits`),
3. if the result equals the latest complete version (same content hash), stops: nothing new,
4. otherwise stores the version row (status ``building``), the new labels and the member rows in
   one transaction,
5. runs the data-quality checks (:mod:`dataset.build.checks`: plain SQL aggregates plus the
   object-store check) and marks the version ``failed`` on any violation,
6. exports the files (:mod:`dataset.build.export`) and only then marks the version ``complete``.

Steps 1-5 and the shard plan are :func:`decide` (one task: the decisions need every member); the
export's shards are :func:`dataset.build.export.export_shard` jobs (the nightly DAG maps them
over workers; a retry rewrites one job's shards); :func:`finish` writes the version's index
files once every shard is stored and marks it complete. ``run`` does all of it in one process.

Only complete versions count as parents or as the split history of later builds, so a failed or
crashed build never changes what the next one does. Decisions and completions are serialised by
an advisory lock. A retried task with the same ``run_key`` gets the version it already completed;
a retried :func:`decide` abandons the unfinished version an earlier attempt of its run left,
and any version another run left ``building`` for longer than ``dataset_stale_build_hours``.
:func:`abandon_incomplete` closes a run whose export did not finish (a shard job failed for
good): its version is marked ``failed`` naming the missing shards, and the step fails.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import timedelta
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import sqlalchemy as sa

from dataset.build import checks, export
from dataset.build.labels import assign_labels, load_label_map, store_new_labels
from dataset.build.selection import select_photos
from dataset.build.splits import SPLITS, SplitCandidate, SplitRatios, assign_splits
from shoplens.config import ConfigError, Settings
# The member columns a version's content hash covers: the exported manifest.parquet's.
from shoplens.export_layout import MANIFEST_COLUMNS as MEMBER_EXPORT_COLUMNS
from shoplens.export_layout import TFRECORD_DIR
from shoplens.manifest import ManifestNotMigrated, engine_for, require_migrated
from shoplens.manifest.schema import dataset_members, dataset_versions

log = logging.getLogger(__name__)

BUILD_LOCK_KEY = 0x5D_B01D  # pg advisory lock id shared by every dataset build
REPO_ROOT = Path(__file__).resolve().parents[2]


class BuildError(RuntimeError):
    """The manifest cannot yield a dataset version (e.g. it has not been migrated)."""


class IncompleteBuild(BuildError):
    """The run's version never completed (its export did not finish); it is now ``failed``."""


@dataclass
class VersionPlan:
    members: list[dict[str, Any]]          # export columns + cluster_id, in export order
    new_labels: dict[int, int]             # product_id -> label, for products new to the map
    excluded: list[dict[str, int]]
    capped: list[dict[str, int]]
    kept_splits: int
    new_images: int
    inherited_splits: int
    moved: list[tuple[str, str, str]]
    kept_images: int

    @functools.cached_property
    def content_hash(self) -> str:
        """Hash of the exported member columns: equal hashes mean equal data files, so an
        unchanged manifest does not make a new version (nor trigger retraining)."""
        digest = hashlib.sha256()
        for m in self.members:
            digest.update(json.dumps([m[c] for c in MEMBER_EXPORT_COLUMNS],
                                     ensure_ascii=False, separators=(",", ":")).encode())
            digest.update(b"\n")
        return digest.hexdigest()

    def counts(self) -> dict[str, Any]:
        split_sizes = Counter(m["split"] for m in self.members)
        return {
            "images": len(self.members),
            "labels": len({m["label"] for m in self.members}),
            "splits": {s: split_sizes.get(s, 0) for s in SPLITS},
            "kept_images_in_manifest": self.kept_images,
            "new_labels": len(self.new_labels),
            "excluded_products": len(self.excluded),
            "capped_products": len(self.capped),
            "images_keeping_split": self.kept_splits,
            "images_new": self.new_images,
            "images_following_cluster": self.inherited_splits,
            "images_moved_to_join_cluster": len(self.moved),
        }


def validate_settings(settings: Settings) -> SplitRatios:
    if settings.dataset_min_photos_per_product < 1:
        raise ConfigError("dataset_min_photos_per_product must be >= 1")
    if settings.dataset_max_photos_per_product < settings.dataset_min_photos_per_product:
        raise ConfigError("dataset_max_photos_per_product must be >= dataset_min_photos_per_product")
    if settings.dataset_images_per_shard < 1:
        raise ConfigError("dataset_images_per_shard must be >= 1")
    if settings.dataset_stale_build_hours <= 0:
        raise ConfigError("dataset_stale_build_hours must be > 0")
    if not settings.dataset_split_seed:
        raise ConfigError("dataset_split_seed must not be empty")
    return SplitRatios.from_settings(settings)


def decide(settings: Settings, run_key: str) -> dict[str, Any]:
    """Steps 1-5: decide (or find) the version for ``run_key``, store its members and splits,
    check them, and plan its export. ``{"build": stats, "shards": [job, ...]}``, the jobs as
    JSON-able dicts for :func:`dataset.build.export.export_shard`; no jobs when the run's version
    is already complete (``reused``) or nothing changed (``unchanged``)."""
    ratios = validate_settings(settings)
    engine = engine_for(settings.manifest_url)
    with _build_lock(engine):
        with engine.connect() as conn:
            try:
                require_migrated(conn)
            except ManifestNotMigrated as exc:
                raise BuildError(f"cannot build a dataset: {exc}") from exc
            done = _complete_version_for_run(conn, run_key)
            if done is not None:
                return {"build": _stats(settings, done, reused=True), "shards": []}
        _abandon_unfinished(settings, engine, run_key)
        _abandon_stale(settings, engine, run_key)
        # One snapshot for all planning reads, so a crawl writing meanwhile cannot skew them.
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
            parent = _latest_complete(conn)
            plan = plan_version(conn, settings, ratios, parent)
        if parent is not None and parent["content_hash"].strip() == plan.content_hash:
            return {"build": _stats(settings, parent, unchanged=True, plan=plan), "shards": []}
        version_id = _insert_version(settings, engine, run_key, parent, plan)
        try:
            check_results = _run_checks(settings, version_id)
            jobs = export.plan_shard_jobs(settings, version_id)
        except BaseException as exc:
            _mark_failed(settings, engine, version_id, exc)
            raise
        with engine.connect() as conn:
            stats = _stats(settings, _version_row(conn, version_id), plan=plan)
    stats["checks"] = {"passed": len(check_results), "failed": 0}
    return {"build": stats, "shards": [job.as_dict() for job in jobs]}


def finish(settings: Settings, run_key: str) -> dict[str, Any]:
    """Step 6's end for the version :func:`decide` made for ``run_key``: once every shard is
    stored, write the index files (version.json last) and mark the version complete; returns
    its stats. When the run's version is already complete, its stats (``reused``); when the run
    made none (nothing changed), the latest complete version's (``unchanged``).

    A missing shard raises :class:`~dataset.build.export.ExportError` naming it and leaves the
    version ``building`` (unreadable): export the shard, then finish again."""
    engine = engine_for(settings.manifest_url)
    with _build_lock(engine):  # a re-run decide cannot abandon the version while it completes
        with engine.connect() as conn:
            row = _unfailed_version_for_run(conn, run_key)
            latest = _latest_complete(conn) if row is None else None
        if row is None:
            if latest is None:
                raise BuildError(f"run {run_key} made no dataset version and none is complete: "
                                 "decide the run's version first")
            return _stats(settings, latest, unchanged=True)
        if row["status"] == "complete":
            return _stats(settings, row, reused=True)
        files = export.finish_export(settings, row["version_id"])
        with engine.begin() as conn:
            conn.execute(dataset_versions.update().where(
                (dataset_versions.c.version_id == row["version_id"])
                & (dataset_versions.c.status == "building")).values(
                status="complete", completed_at=sa.func.now()))
            row = _version_row(conn, row["version_id"])
    stats = _stats(settings, row)
    stats["files"] = {"count": len(files), "bytes": sum(f["bytes"] for f in files.values()),
                      "shards": sum(f.startswith(f"{TFRECORD_DIR}/") for f in files)}
    return stats


EXPORT_UNFINISHED = "abandoned: its export did not finish"  # a version abandon_incomplete failed


def abandon_incomplete(settings: Settings, run_key: str) -> dict[str, Any]:
    """After every shard job of the run ended, however: when the run's version is still
    ``building`` and shards are missing from the store (a job failed for good), the version can
    never complete: mark it ``failed`` naming them, remove its files and raise
    :class:`IncompleteBuild` (again when re-run). Otherwise nothing to do
    (``{"abandoned": None}``): no version, one complete or failed in its checks, or every shard
    stored (completing it is :func:`finish`'s job, which may be running now)."""
    engine = engine_for(settings.manifest_url)
    with _build_lock(engine):
        with engine.connect() as conn:
            row = conn.execute(sa.select(dataset_versions).where(
                dataset_versions.c.run_key == run_key)
                .order_by(dataset_versions.c.seq.desc()).limit(1)).mappings().first()
        if row is None or row["status"] == "complete":
            return {"abandoned": None}
        version_id, reason = row["version_id"], row["error"] or ""
        if row["status"] == "building":
            missing = export.missing_shards(settings, version_id)
            if not missing:
                return {"abandoned": None}
            reason = f"{EXPORT_UNFINISHED}: {missing}"
            _mark_failed(settings, engine, version_id, IncompleteBuild(reason), plain=True)
        elif not reason.startswith(EXPORT_UNFINISHED):  # failed its checks: build_plan said so
            return {"abandoned": None}
    raise IncompleteBuild(f"dataset version {version_id} of run {run_key} is failed, {reason}")


def run(settings: Settings, run_key: str) -> dict[str, Any]:
    """Build (or find) the dataset version for ``run_key`` in this process; returns its stats.
    Any failure after the version was stored marks it ``failed`` and removes its files."""
    decided = decide(settings, run_key)
    try:
        for job in decided["shards"]:
            export.export_shard(settings, job)
        return {**decided["build"], **finish(settings, run_key)}
    except BaseException as exc:
        if decided["shards"]:
            _mark_failed(settings, engine_for(settings.manifest_url),
                         decided["build"]["version_id"], exc)
        raise


# --- planning (pure reads) ------------------------------------------------------------------

KEPT_SQL = sa.text("""
    SELECT k.sha256, k.object_key, k.product_id, k.review_id, k.source_url,
           k.first_seen_run AS crawl_run, k.width, k.height, k.format,
           COALESCE(k.cluster_id, k.sha256) AS cluster_id,
           p.name AS product_name, p.category_id
    FROM kept_images k JOIN products p ON p.id = k.product_id
""")

# Split of every image in the newest complete version that held it.
EARLIER_SPLITS_SQL = sa.text("""
    SELECT DISTINCT ON (m.sha256) m.sha256, m.split
    FROM dataset_members m JOIN dataset_versions v ON v.version_id = m.version_id
    WHERE v.status = 'complete'
    ORDER BY m.sha256, v.seq DESC
""")

# Earlier splits per current dedup cluster, over every image ever in a complete version.
CLUSTER_HISTORY_SQL = sa.text("""
    WITH earlier AS (
        SELECT DISTINCT ON (m.sha256) m.sha256, m.split
        FROM dataset_members m JOIN dataset_versions v ON v.version_id = m.version_id
        WHERE v.status = 'complete'
        ORDER BY m.sha256, v.seq DESC
    )
    SELECT d.cluster_id, e.split, count(*) AS images
    FROM earlier e JOIN image_dedup d ON d.sha256 = e.sha256
    GROUP BY d.cluster_id, e.split
""")


@dataclass(frozen=True)
class _Kept:
    sha256: str
    product_id: int
    row: dict


def plan_version(conn: sa.Connection, settings: Settings, ratios: SplitRatios,
                 parent: dict | None) -> VersionPlan:
    kept = [dict(r) for r in conn.execute(KEPT_SQL).mappings()]
    for r in kept:
        r["sha256"] = r["sha256"].strip()
        r["cluster_id"] = r["cluster_id"].strip()
    in_parent: set[str] = set()
    if parent is not None:
        in_parent = {s.strip() for s in conn.execute(sa.select(dataset_members.c.sha256).where(
            dataset_members.c.version_id == parent["version_id"])).scalars()}
    selection = select_photos([_Kept(r["sha256"], int(r["product_id"]), r) for r in kept],
                              settings.dataset_min_photos_per_product,
                              settings.dataset_max_photos_per_product, in_parent,
                              settings.dataset_split_seed)
    chosen = [k.row for k in selection.chosen]

    label_of = load_label_map(conn)
    new_labels = assign_labels(label_of, {r["product_id"] for r in chosen})
    label_of = {**label_of, **new_labels}

    earlier = {s.strip(): split for s, split in conn.execute(EARLIER_SPLITS_SQL).all()}
    history: dict[str, dict[str, int]] = defaultdict(dict)
    for cluster_id, split, images in conn.execute(CLUSTER_HISTORY_SQL).all():
        history[cluster_id.strip()][split] = int(images)
    assignment = assign_splits(
        [SplitCandidate(r["sha256"], int(r["product_id"]), r["cluster_id"]) for r in chosen],
        earlier, ratios, settings.dataset_split_seed, history)

    members = []
    for r in chosen:
        members.append({
            **{c: r[c] for c in MEMBER_EXPORT_COLUMNS if c in r},
            "label": label_of[int(r["product_id"])],
            "split": assignment.splits[r["sha256"]],
            "product_id": int(r["product_id"]),
            "cluster_id": r["cluster_id"],
        })
    members.sort(key=export.member_sort_key)
    return VersionPlan(members=members, new_labels=new_labels, excluded=selection.excluded,
                       capped=selection.capped, kept_splits=assignment.kept,
                       new_images=assignment.new, inherited_splits=assignment.inherited,
                       moved=assignment.moved, kept_images=len(kept))


# --- writing --------------------------------------------------------------------------------


def _insert_version(settings: Settings, engine: sa.Engine, run_key: str, parent: dict | None,
                    plan: VersionPlan) -> str:
    with engine.begin() as conn:
        seq = int(conn.execute(sa.text(
            "SELECT COALESCE(MAX(seq), 0) + 1 FROM dataset_versions")).scalar_one())
        version_id = f"v{seq:04d}"
        conn.execute(dataset_versions.insert().values(
            version_id=version_id, seq=seq,
            parent_version=parent["version_id"] if parent else None,
            run_key=run_key, status="building", code_version=code_version(),
            params=build_params(conn, settings), counts=plan.counts(),
            excluded_products=plan.excluded, content_hash=plan.content_hash,
            uri=export.version_uri(settings, version_id)))
        store_new_labels(conn, plan.new_labels, version_id)
        if plan.members:
            conn.execute(dataset_members.insert(),
                         [{**m, "version_id": version_id} for m in plan.members])
    return version_id


def _run_checks(settings: Settings, version_id: str) -> list[checks.CheckResult]:
    results = checks.run_sql_checks(settings, version_id)
    failed = [r for r in results if not r.passed]
    missing = checks.missing_objects(settings, version_id)
    if failed or missing:
        lines = [f"{r.table}.{r.name} (got {r.actual})" for r in failed]
        if missing:
            lines.append(f"{len(missing)} member object(s) missing from the store, e.g. "
                         + ", ".join(missing[:5]))
        raise checks.DataQualityError(
            f"dataset version {version_id} failed {len(lines)} data-quality check(s): "
            + "; ".join(lines))
    return results


def _mark_failed(settings: Settings, engine: sa.Engine, version_id: str, exc: BaseException,
                 plain: bool = False) -> None:
    error = str(exc) if plain else f"{type(exc).__name__}: {exc}"
    with engine.begin() as conn:
        conn.execute(dataset_versions.update().where(
            dataset_versions.c.version_id == version_id).values(status="failed", error=error[:20000]))
    _remove_partial_export(settings, version_id)


def _abandon_unfinished(settings: Settings, engine: sa.Engine, run_key: str) -> None:
    """A crashed attempt of this run left a 'building' version: mark it failed, drop its files."""
    with engine.begin() as conn:
        stale = conn.execute(dataset_versions.update().where(
            (dataset_versions.c.run_key == run_key) & (dataset_versions.c.status == "building")
        ).values(status="failed", error="abandoned: the build did not finish (retried)")
        .returning(dataset_versions.c.version_id)).scalars().all()
    for version_id in stale:
        _remove_partial_export(settings, version_id)


def _abandon_stale(settings: Settings, engine: sa.Engine, run_key: str) -> None:
    """Versions other runs left ``building`` for longer than ``dataset_stale_build_hours``: mark
    them failed (their run ended without finishing them), drop their files.

    Age tells a dead run from a live one: a version has no heartbeat, and exports run outside
    the build lock, so a younger ``building`` version may be a concurrent run's (a manual run, a
    CLI build) still exporting; none lives longer than a night, and nights are a day apart."""
    hours = settings.dataset_stale_build_hours
    with engine.begin() as conn:
        stale = conn.execute(dataset_versions.update().where(
            (dataset_versions.c.run_key != run_key) & (dataset_versions.c.status == "building")
            & (dataset_versions.c.created_at < sa.func.now() - timedelta(hours=hours))
        ).values(status="failed", error=sa.func.concat(
            f"abandoned by run {run_key}: still building after more than {hours:g} h; run ",
            dataset_versions.c.run_key, " ended without finishing it"))
        .returning(dataset_versions.c.version_id)).scalars().all()
    for version_id in stale:
        log.warning("abandoned stale dataset version %s (building for over %g h)", version_id, hours)
        _remove_partial_export(settings, version_id)


def _remove_partial_export(settings: Settings, version_id: str) -> None:
    """Best effort: a failed version must not leave files that look like a dataset."""
    try:
        export.remove_export(settings, version_id)
    except Exception as exc:  # the store may be what failed; the version row already says so
        log.warning("could not remove the partial export of %s: %s", version_id, exc)


# --- reading helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock(engine: sa.Engine) -> Iterator[None]:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": BUILD_LOCK_KEY})
        conn.commit()
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": BUILD_LOCK_KEY})
            conn.commit()


def _version_row(conn: sa.Connection, version_id: str) -> dict:
    return dict(conn.execute(sa.select(dataset_versions).where(
        dataset_versions.c.version_id == version_id)).mappings().one())


def _unfailed_version_for_run(conn: sa.Connection, run_key: str) -> dict | None:
    """The run's newest version that is building or complete (decide leaves at most one)."""
    row = conn.execute(sa.select(dataset_versions).where(
        (dataset_versions.c.run_key == run_key) & (dataset_versions.c.status != "failed"))
        .order_by(dataset_versions.c.seq.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def _complete_version_for_run(conn: sa.Connection, run_key: str) -> dict | None:
    row = conn.execute(sa.select(dataset_versions).where(
        (dataset_versions.c.run_key == run_key) & (dataset_versions.c.status == "complete"))
        .order_by(dataset_versions.c.seq.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def _latest_complete(conn: sa.Connection) -> dict | None:
    row = conn.execute(sa.select(dataset_versions).where(dataset_versions.c.status == "complete")
                       .order_by(dataset_versions.c.seq.desc()).limit(1)).mappings().first()
    return dict(row) if row else None


def latest_version_id(settings: Settings) -> str | None:
    with engine_for(settings.manifest_url).connect() as conn:
        row = _latest_complete(conn)
    return row["version_id"] if row else None


def _stats(settings: Settings, row: dict, *, reused: bool = False, unchanged: bool = False,
           plan: VersionPlan | None = None) -> dict[str, Any]:
    stats = {
        "version_id": row["version_id"],
        "parent_version": row["parent_version"],
        "uri": row["uri"],
        "content_hash": row["content_hash"].strip(),
        "code_version": row["code_version"],
        "created_at": row["created_at"].isoformat(),
        "counts": row["counts"],
        "excluded_products": row["excluded_products"],
        "reused": reused,
        "unchanged": unchanged,
    }
    if plan is not None:
        stats["capped_products"] = plan.capped
        stats["moved_to_join_cluster"] = [
            {"sha256": s, "from": a, "to": b} for s, a, b in plan.moved]
    return stats


# --- provenance -----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """The code that built a version: git commit (with -dirty) when available."""
    try:
        described = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return f"git:{described}"
    except (OSError, subprocess.SubprocessError):
        return "git:unknown"


def _package_version(*names: str) -> str | None:
    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def build_params(conn: sa.Connection, settings: Settings) -> dict[str, Any]:
    """The rules and thresholds in force: build, dedup and filter settings, and what the
    manifest records about the dedup and filter runs the kept images came from."""
    public = settings.public_dict()
    params: dict[str, Any] = {
        "build": {
            "min_photos_per_product": settings.dataset_min_photos_per_product,
            "max_photos_per_product": settings.dataset_max_photos_per_product,
            "split_ratios": SplitRatios.from_settings(settings).as_dict(),
            "split_seed": settings.dataset_split_seed,
            "images_per_shard": settings.dataset_images_per_shard,
        },
        "dedup_settings": {k: v for k, v in public.items() if k.startswith("dedup_")},
        "filter_settings": {k: v for k, v in public.items()
                            if k.startswith(("filter_", "detector_"))},
        "software": {
            "pyarrow": _package_version("pyarrow"),
            "tensorflow": _package_version("tensorflow-cpu", "tensorflow"),
            "protobuf": _package_version("protobuf"),
        },
    }
    params["dedup_thresholds"] = [
        t for t in conn.execute(sa.text(
            "SELECT DISTINCT d.threshold FROM image_dedup d JOIN kept_images k"
            " ON k.sha256 = d.sha256 WHERE d.threshold IS NOT NULL ORDER BY 1")).scalars()]
    last = conn.execute(sa.text(
        "SELECT id, run_key, detector_version, rule_version, params FROM filter_runs"
        " WHERE status = 'success' ORDER BY id DESC LIMIT 1")).mappings().first()
    params["filter_run"] = ({**dict(last), "id": int(last["id"])} if last else None)
    return json.loads(json.dumps(params, default=str))

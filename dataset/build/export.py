"""The dataset build's writer of a version's files in the object store, byte-deterministically.

The files and their names, the TFRecord features and the completeness marker are the export
layout of :mod:`shoplens.export_layout` (the contract every reader shares); this module fills it
from the manifest. manifest.parquet is sorted by split (in the order train, val, test), label,
sha256; within a split, TFRecord records are ordered by sha256.

Everything is derived from the manifest's rows for the version (``dataset_versions`` and the
``dataset_members`` snapshot) and the content-addressed image objects: no timestamps beyond the
version's stored ``created_at``, fixed row order, fixed writer options. So :func:`rematerialise`
rebuilds a version byte for byte from the manifest alone; the contract's ``materialise``
downloads a version to a local directory, checking every file's digest.

In the store a version is written in steps that may run on different workers:

1. :func:`plan_shard_jobs` names the version's shards (from its split sizes and
   ``images_per_shard``, see :func:`shoplens.export_layout.shard_ranges`) and groups them into
   at most ``MAX_BATCHES`` small, JSON-able jobs;
2. :func:`export_shard` writes the shards of one job: it reads just their members from the
   manifest (one split, sha256 order, a row range), fetches the images and PUTs each shard under
   its final key with its sha256 as object metadata. A PUT is atomic and the bytes are a function
   of the manifest's rows, so a retried or repeated job rewrites the same objects with the same
   bytes, in any order;
3. :func:`finish_export` checks that every planned shard is in the store (a missing one fails
   with its name), then writes manifest.parquet, labels.json and, last, version.json, the
   completeness marker, from the shards' stored digests. Until then no reader accepts the
   version.
"""
from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timezone
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa
from minio.error import S3Error

from shoplens import export_layout as layout
from shoplens.batches import MAX_BATCHES
from shoplens.config import Settings
# The member columns the export carries are manifest.parquet's, in its order.
from shoplens.export_layout import MANIFEST_COLUMNS as MEMBER_EXPORT_COLUMNS
from shoplens.export_layout import LABELS_FILE, MANIFEST_FILE, SPLITS, VERSION_FILE, version_prefix
from shoplens.manifest import engine_for
from shoplens.manifest.schema import dataset_members, dataset_versions
from shoplens.progress import progress
from shoplens.store import ObjectStore

# Object metadata of a stored shard: its sha256, which version.json lists (S3 adds x-amz-meta-).
SHARD_DIGEST_METADATA = "sha256"


class ExportError(RuntimeError):
    """A version's files could not be written, read back or verified."""


def version_uri(settings: Settings, version_id: str) -> str:
    return layout.version_uri(settings.s3_bucket, version_id)


@dataclass(frozen=True)
class VersionSnapshot:
    """A version as the manifest stores it: its row and its member rows in export order."""
    version: dict[str, Any]
    members: list[dict[str, Any]]

    @property
    def version_id(self) -> str:
        return self.version["version_id"]


def member_sort_key(member: dict[str, Any]) -> tuple:
    return SPLITS.index(member["split"]), member["label"], member["sha256"]


def _version_row(conn: sa.Connection, version_id: str) -> dict[str, Any]:
    row = conn.execute(sa.select(dataset_versions).where(
        dataset_versions.c.version_id == version_id)).mappings().first()
    if row is None:
        raise ExportError(f"no dataset version {version_id!r} in the manifest")
    return dict(row)


def load_snapshot(conn: sa.Connection, version_id: str) -> VersionSnapshot:
    row = _version_row(conn, version_id)
    members = [dict(m) for m in conn.execute(
        sa.select(*[dataset_members.c[c] for c in MEMBER_EXPORT_COLUMNS]).where(
            dataset_members.c.version_id == version_id)).mappings()]
    for m in members:
        m["sha256"] = m["sha256"].strip()
    members.sort(key=member_sort_key)
    return VersionSnapshot(version=row, members=members)


# --- the files ------------------------------------------------------------------------------


def version_fields(version: dict[str, Any]) -> dict[str, Any]:
    """version.json's content besides ``files``: the version's manifest row."""
    created = version["created_at"].astimezone(timezone.utc).isoformat()
    return {
        "version_id": version["version_id"],
        "parent_version": version["parent_version"],
        "created_at": created,
        "run_key": version["run_key"],
        "code_version": version["code_version"],
        "content_hash": version["content_hash"].strip(),
        "uri": version["uri"],
        "params": version["params"],
        "counts": version["counts"],
        "excluded_products": version["excluded_products"],
    }


def write_version_files(snapshot: VersionSnapshot, fetch: Callable[[str], bytes],
                        out_dir: Path) -> dict[str, dict[str, Any]]:
    """Write all files of a version into ``out_dir``; returns ``{relpath: {sha256, bytes}}``."""
    shards = layout.shard_plan(snapshot.members, _images_per_shard(snapshot.version))
    try:
        return layout.write_version_files(out_dir, snapshot.members, fetch, shards,
                                          version_fields(snapshot.version))
    except layout.DatasetError as exc:  # an image object that no longer holds its bytes
        raise ExportError(str(exc)) from exc


# --- object store, one shard at a time -----------------------------------------------------


@dataclass(frozen=True)
class ShardJob:
    """Shards of one version that one mapped task writes (usually one; more only when a version
    has more shards than Airflow maps tasks)."""

    version_id: str
    index: int
    count: int  # jobs in the plan
    shards: tuple[str, ...]  # relative shard paths, e.g. tfrecords/train-00003-of-00012.tfrecord

    @property
    def label(self) -> str:
        return f"export {self.version_id} shard job {self.index + 1}/{self.count}"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "shards": list(self.shards)}

    @classmethod
    def of(cls, value: "ShardJob | dict") -> "ShardJob":
        """A job from itself or from its :meth:`as_dict` form (what XCom hands a mapped task)."""
        if isinstance(value, ShardJob):
            return value
        return cls(**{**value, "shards": tuple(value["shards"])})


def _images_per_shard(version: dict[str, Any]) -> int:
    images_per_shard = int(version["params"]["build"]["images_per_shard"])
    if images_per_shard < 1:
        raise ExportError(f"images_per_shard must be >= 1, got {images_per_shard}")
    return images_per_shard


def planned_shards(conn: sa.Connection, version_id: str) -> dict[str, tuple[str, int, int]]:
    """The version's shards: relative path -> (split, start, stop) in the split's sha256 order."""
    version = _version_row(conn, version_id)
    sizes = dict(conn.execute(
        sa.select(dataset_members.c.split, sa.func.count()).where(
            dataset_members.c.version_id == version_id).group_by(dataset_members.c.split)).all())
    return layout.shard_ranges(sizes, _images_per_shard(version))


def plan_shard_jobs(settings: Settings, version_id: str,
                    max_jobs: int = MAX_BATCHES) -> list[ShardJob]:
    """The version's shards as jobs for mapped tasks: one shard each, or consecutive shards
    grouped evenly when there are more than ``max_jobs``. The same version always gives the
    same plan."""
    with engine_for(settings.manifest_url).connect() as conn:
        shards = list(planned_shards(conn, version_id))
    count = min(len(shards), max_jobs)
    return [ShardJob(version_id, k, count, tuple(shards[k * len(shards) // count:
                                                       (k + 1) * len(shards) // count]))
            for k in range(count)]


def shard_members(conn: sa.Connection, version_id: str, split: str, start: int,
                  stop: int) -> list[dict[str, Any]]:
    """Members ``[start, stop)`` of a split in sha256 order: exactly one shard's records."""
    sha = dataset_members.c.sha256
    rows = [dict(m) for m in conn.execute(
        sa.select(dataset_members.c.sha256, dataset_members.c.object_key, dataset_members.c.label)
        .where((dataset_members.c.version_id == version_id) & (dataset_members.c.split == split))
        .order_by(sha.collate("C")).offset(start).limit(stop - start)).mappings()]
    for m in rows:
        m["sha256"] = m["sha256"].strip()
    return rows


def export_shard(settings: Settings, job: ShardJob | dict) -> dict[str, Any]:
    """Write the job's shards to the store under their final keys; returns their digests.

    Idempotent: a shard's bytes depend only on the manifest's rows, so a retry (or a second
    worker) PUTs the same bytes under the same key. A version a re-planned build has abandoned
    (``failed``) is not written to."""
    job = ShardJob.of(job)
    store = ObjectStore(settings)
    prefix = version_prefix(job.version_id)
    with engine_for(settings.manifest_url).connect() as conn:
        status = _version_row(conn, job.version_id)["status"]
        if status == "failed":
            raise ExportError(f"dataset version {job.version_id} is failed (abandoned); "
                              f"{job.label} writes nothing")
        planned = planned_shards(conn, job.version_id)
        unknown = [s for s in job.shards if s not in planned]
        if unknown:
            raise ExportError(f"{job.label}: {', '.join(unknown)} not shard(s) of "
                              f"{job.version_id}: plan again")
        records = {relpath: shard_members(conn, job.version_id, *planned[relpath])
                   for relpath in job.shards}
    written: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix=f"shoplens-{job.version_id}-shard-") as tmp, \
            ThreadPoolExecutor(layout.FETCH_THREADS) as pool, \
            progress(total=sum(map(len, records.values())), desc=job.label, unit="photos") as shown:
        for relpath, rows in records.items():
            path = Path(tmp) / relpath
            try:
                written[relpath] = layout.write_shard(path, rows, store.get_bytes, pool,
                                                      shown.advance)
            except layout.DatasetError as exc:  # an image object that no longer holds its bytes
                raise ExportError(str(exc)) from exc
            store.client.fput_object(store.bucket, prefix + relpath, str(path),
                                     content_type="application/octet-stream",
                                     metadata={SHARD_DIGEST_METADATA: written[relpath]["sha256"]})
            path.unlink()  # a job of several shards holds one on disk at a time
    return {"version_id": job.version_id, "job": job.index, "shards": written,
            "images": sum(map(len, records.values()))}


def _stored_shard(store: ObjectStore, key: str) -> dict[str, Any] | None:
    """A stored shard's digest from its object metadata; None when the object is missing."""
    try:
        stat = store.client.stat_object(store.bucket, key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject", "ResourceNotFound"):
            return None
        raise
    sha256 = next((v for k, v in (stat.metadata or {}).items()
                   if k.lower() == f"x-amz-meta-{SHARD_DIGEST_METADATA}"), None)
    if not sha256:
        raise ExportError(f"{key} in the store has no {SHARD_DIGEST_METADATA} metadata: "
                          "not written by export_shard; run its job again")
    return {"sha256": sha256, "bytes": stat.size}


def _stored_shards(store: ObjectStore, snapshot: VersionSnapshot) -> dict[str, dict | None]:
    """Every planned shard of the version -> its stored digest, or None when it is missing."""
    prefix = version_prefix(snapshot.version_id)
    shards = layout.shard_ranges(
        {split: sum(m["split"] == split for m in snapshot.members) for split in SPLITS},
        _images_per_shard(snapshot.version))
    with ThreadPoolExecutor(layout.FETCH_THREADS) as pool:
        return dict(zip(shards, pool.map(lambda relpath: _stored_shard(store, prefix + relpath),
                                         shards)))


def _missing_text(missing: list[str], total: int) -> str:
    return (f"{len(missing)} of {total} shard(s) missing from the store "
            f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})")


def missing_shards(settings: Settings, version_id: str) -> str | None:
    """Which planned shards of the version are not in the store, as one line; None when all are."""
    with engine_for(settings.manifest_url).connect() as conn:
        snapshot = load_snapshot(conn, version_id)
    stored = _stored_shards(ObjectStore(settings), snapshot)
    missing = [relpath for relpath, found in stored.items() if found is None]
    return _missing_text(missing, len(stored)) if missing else None


def finish_export(settings: Settings, version_id: str) -> dict[str, dict[str, Any]]:
    """Write the version's manifest.parquet, labels.json and, last, version.json, once every
    planned shard is in the store; returns ``{relpath: digest}`` of every file.

    A missing shard raises ExportError naming it, and nothing is written: the version stays
    unreadable until its shards are exported and this step runs again."""
    store = ObjectStore(settings)
    prefix = version_prefix(version_id)
    with engine_for(settings.manifest_url).connect() as conn:
        snapshot = load_snapshot(conn, version_id)
    stored = _stored_shards(store, snapshot)
    missing = [relpath for relpath, found in stored.items() if found is None]
    if missing:
        raise ExportError(
            f"dataset version {version_id} is incomplete: {_missing_text(missing, len(stored))};"
            " their export_shard jobs did not finish: run them again, then finish the version")
    files: dict[str, dict[str, Any]] = dict(stored)
    for relpath, data in ((MANIFEST_FILE, layout.manifest_parquet_bytes(snapshot.members)),
                          (LABELS_FILE, layout.json_bytes(layout.labels_document(snapshot.members)))):
        store.put_bytes(prefix + relpath, data, "application/json"
                        if relpath.endswith(".json") else "application/octet-stream")
        files[relpath] = layout.digest(data)
    version_data = layout.version_document(version_fields(snapshot.version), files)
    store.put_bytes(prefix + VERSION_FILE, version_data, "application/json")  # the marker, last
    return {**dict(sorted(files.items())), VERSION_FILE: layout.digest(version_data)}


def rematerialise(settings: Settings, version_id: str, local_dir: str | Path) -> dict[str, dict]:
    """Rebuild a version's files from the manifest (and the image objects) into ``local_dir``."""
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    with engine_for(settings.manifest_url).connect() as conn:
        snapshot = load_snapshot(conn, version_id)
    return write_version_files(snapshot, ObjectStore(settings).get_bytes, out)


def verify_export(settings: Settings, version_id: str) -> list[str]:
    """Files whose stored bytes differ from a fresh re-materialisation (empty when identical)."""
    store = ObjectStore(settings)
    prefix = version_prefix(version_id)
    with tempfile.TemporaryDirectory(prefix=f"shoplens-verify-{version_id}-") as tmp:
        expected = rematerialise(settings, version_id, tmp)
    stored = {key[len(prefix):] for key in store.list_keys(prefix)}
    problems = [f"{p}: missing in the store" for p in sorted(set(expected) - stored)]
    problems += [f"{p}: not part of the version" for p in sorted(stored - set(expected))]
    for relpath in sorted(set(expected) & stored):
        if layout.digest(store.get_bytes(prefix + relpath)) != expected[relpath]:
            problems.append(f"{relpath}: stored bytes differ from the manifest's")
    return problems


def remove_export(settings: Settings, version_id: str) -> int:
    """Delete whatever an abandoned build left under the version's prefix; returns the count."""
    store = ObjectStore(settings)
    keys = list(store.list_keys(version_prefix(version_id)))
    for key in keys:
        store.remove(key)
    return len(keys)


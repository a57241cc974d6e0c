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
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any, Callable

import sqlalchemy as sa

from shoplens import export_layout as layout
from shoplens.config import Settings
# The member columns the export carries are manifest.parquet's, in its order.
from shoplens.export_layout import MANIFEST_COLUMNS as MEMBER_EXPORT_COLUMNS
from shoplens.export_layout import SPLITS, version_prefix
from shoplens.manifest import engine_for
from shoplens.manifest.schema import dataset_members, dataset_versions
from shoplens.store import ObjectStore


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


def load_snapshot(conn: sa.Connection, version_id: str) -> VersionSnapshot:
    row = conn.execute(sa.select(dataset_versions).where(
        dataset_versions.c.version_id == version_id)).mappings().first()
    if row is None:
        raise ExportError(f"no dataset version {version_id!r} in the manifest")
    members = [dict(m) for m in conn.execute(
        sa.select(*[dataset_members.c[c] for c in MEMBER_EXPORT_COLUMNS]).where(
            dataset_members.c.version_id == version_id)).mappings()]
    for m in members:
        m["sha256"] = m["sha256"].strip()
    members.sort(key=member_sort_key)
    return VersionSnapshot(version=dict(row), members=members)


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
    images_per_shard = int(snapshot.version["params"]["build"]["images_per_shard"])
    if images_per_shard < 1:
        raise ExportError(f"images_per_shard must be >= 1, got {images_per_shard}")
    shards = layout.shard_plan(snapshot.members, images_per_shard)
    try:
        return layout.write_version_files(out_dir, snapshot.members, fetch, shards,
                                          version_fields(snapshot.version))
    except layout.DatasetError as exc:  # an image object that no longer holds its bytes
        raise ExportError(str(exc)) from exc


# --- object store ---------------------------------------------------------------------------


def export_version(settings: Settings, version_id: str) -> dict[str, dict[str, Any]]:
    """Write a version's files to ``datasets/<version_id>/`` (version.json last, the marker)."""
    store = ObjectStore(settings)
    with engine_for(settings.manifest_url).connect() as conn:
        snapshot = load_snapshot(conn, version_id)
    with tempfile.TemporaryDirectory(prefix=f"shoplens-{version_id}-") as tmp:
        out = Path(tmp)
        files = write_version_files(snapshot, store.get_bytes, out)
        layout.upload_version(store, version_id, out)
    return files


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


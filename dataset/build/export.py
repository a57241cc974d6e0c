"""A dataset version's files in the object store, written byte-deterministically.

Layout under ``datasets/<version_id>/`` (the contract the modeling stage reads):

- ``manifest.parquet``: one row per image, columns :data:`PARQUET_SCHEMA`, sorted by split (in
  the order train, val, test), label, sha256.
- ``labels.json``: ``{"labels": [{"label", "product_id", "name", "category_id"}], "num_classes"}``
  with the version's labels only; label ids are the stable global ones, so
  ``num_classes = max label + 1``.
- ``tfrecords/<split>-<i:05d>-of-<n:05d>.tfrecord``: ``tf.train.Example`` records with
  ``image/encoded`` (the stored object's bytes), ``image/sha256`` and ``image/label``. Within a
  split, records are ordered by sha256 (effectively a shuffle that is independent of labels) and
  cut into ``n = ceil(images / images_per_shard)`` contiguous, near-equal shards.
- ``version.json``: the version's metadata and the sha256 and size of every other file.

Everything is derived from the manifest's rows for the version (``dataset_versions`` and the
``dataset_members`` snapshot) and the content-addressed image objects: no timestamps beyond the
version's stored ``created_at``, fixed row order, fixed writer options. So :func:`rematerialise`
rebuilds a version byte for byte from the manifest alone, and :func:`materialise` downloads a
version to a local directory in the same layout, checking every file's digest.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timezone
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa

from dataset.build.tables import MEMBER_EXPORT_COLUMNS, dataset_members, dataset_versions
from dataset.build.splits import SPLITS
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.progress import progress
from shoplens.store import ObjectStore

DATASETS_PREFIX = "datasets"
MANIFEST_FILE = "manifest.parquet"
LABELS_FILE = "labels.json"
VERSION_FILE = "version.json"
TFRECORD_DIR = "tfrecords"
FETCH_THREADS = 8

PARQUET_SCHEMA = pa.schema([
    ("sha256", pa.string()),
    ("object_key", pa.string()),
    ("label", pa.int32()),
    ("product_id", pa.int64()),
    ("product_name", pa.string()),
    ("category_id", pa.string()),
    ("split", pa.string()),
    ("review_id", pa.int64()),
    ("source_url", pa.string()),
    ("crawl_run", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("format", pa.string()),
])
assert tuple(PARQUET_SCHEMA.names) == MEMBER_EXPORT_COLUMNS


class ExportError(RuntimeError):
    """A version's files could not be written, read back or verified."""


def version_prefix(version_id: str) -> str:
    return f"{DATASETS_PREFIX}/{version_id}/"


def version_uri(settings: Settings, version_id: str) -> str:
    return f"s3://{settings.s3_bucket}/{version_prefix(version_id)}"


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


def manifest_parquet_bytes(members: list[dict[str, Any]]) -> bytes:
    table = pa.Table.from_pylist(members, schema=PARQUET_SCHEMA)
    sink = io.BytesIO()
    # Every option that could vary between writers is pinned; a version's file is a function of
    # its rows (and the pyarrow version, which version.json records).
    pq.write_table(table, sink, row_group_size=max(len(members), 1), compression="zstd",
                   compression_level=3, use_dictionary=True, write_statistics=True,
                   version="2.6", data_page_version="1.0", store_schema=True)
    return sink.getvalue()


def labels_document(members: list[dict[str, Any]]) -> dict[str, Any]:
    labels: dict[int, dict[str, Any]] = {}
    for m in members:
        labels.setdefault(m["label"], {"label": m["label"], "product_id": m["product_id"],
                                       "name": m["product_name"], "category_id": m["category_id"]})
    ordered = [labels[k] for k in sorted(labels)]
    return {"labels": ordered, "num_classes": (max(labels) + 1) if labels else 0}


def json_bytes(document: Any) -> bytes:
    return (json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()


def version_document(version: dict[str, Any], files: dict[str, dict[str, Any]]) -> dict[str, Any]:
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
        "files": files,
    }


def shard_plan(members: list[dict[str, Any]], images_per_shard: int) -> dict[str, list[list[dict]]]:
    """Relative shard path -> its records, for every split that has images."""
    if images_per_shard < 1:
        raise ExportError(f"images_per_shard must be >= 1, got {images_per_shard}")
    plan: dict[str, list[dict]] = {}
    for split in SPLITS:
        rows = sorted((m for m in members if m["split"] == split), key=lambda m: m["sha256"])
        if not rows:
            continue
        n = math.ceil(len(rows) / images_per_shard)
        for i in range(n):
            chunk = rows[i * len(rows) // n:(i + 1) * len(rows) // n]
            plan[f"{TFRECORD_DIR}/{split}-{i:05d}-of-{n:05d}.tfrecord"] = chunk
    return plan


def _example_bytes(tf, data: bytes, sha256: str, label: int) -> bytes:
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        "image/sha256": tf.train.Feature(bytes_list=tf.train.BytesList(value=[sha256.encode()])),
        "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Protobuf map order is unspecified unless asked for: deterministic=True sorts the keys.
    return example.SerializeToString(deterministic=True)


def write_version_files(snapshot: VersionSnapshot, fetch: Callable[[str], bytes],
                        out_dir: Path) -> dict[str, dict[str, Any]]:
    """Write all files of a version into ``out_dir``; returns ``{relpath: {sha256, bytes}}``."""
    import tensorflow as tf

    files: dict[str, dict[str, Any]] = {}
    images_per_shard = int(snapshot.version["params"]["build"]["images_per_shard"])
    with ThreadPoolExecutor(FETCH_THREADS) as pool, \
            progress(total=len(snapshot.members), desc=f"export {snapshot.version_id}",
                     unit="photos") as shown:
        for relpath, records in shard_plan(snapshot.members, images_per_shard).items():
            path = out_dir / relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            with tf.io.TFRecordWriter(str(path)) as writer:
                for record, data in zip(records, pool.map(lambda r: fetch(r["object_key"]), records)):
                    if hashlib.sha256(data).hexdigest() != record["sha256"]:
                        raise ExportError(f"object {record['object_key']} does not hold the bytes "
                                          f"of {record['sha256']} (corrupt or replaced)")
                    writer.write(_example_bytes(tf, data, record["sha256"], record["label"]))
                    shown.advance()
            files[relpath] = _file_digest(path)
    for relpath, data in ((MANIFEST_FILE, manifest_parquet_bytes(snapshot.members)),
                          (LABELS_FILE, json_bytes(labels_document(snapshot.members)))):
        (out_dir / relpath).write_bytes(data)
        files[relpath] = _digest(data)
    files = dict(sorted(files.items()))
    version_data = json_bytes(version_document(snapshot.version, files))
    (out_dir / VERSION_FILE).write_bytes(version_data)
    return {**files, VERSION_FILE: _digest(version_data)}


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _file_digest(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}


# --- object store ---------------------------------------------------------------------------


def export_version(settings: Settings, version_id: str) -> dict[str, dict[str, Any]]:
    """Write a version's files to ``datasets/<version_id>/``; version.json goes last, so a
    reader that finds version.json finds every file it lists."""
    store = ObjectStore(settings)
    with engine_for(settings.manifest_url).connect() as conn:
        snapshot = load_snapshot(conn, version_id)
    with tempfile.TemporaryDirectory(prefix=f"shoplens-{version_id}-") as tmp:
        out = Path(tmp)
        files = write_version_files(snapshot, store.get_bytes, out)
        prefix = version_prefix(version_id)
        order = [p for p in files if p != VERSION_FILE] + [VERSION_FILE]
        for relpath in progress(order, f"upload {version_id}", unit="files"):
            content_type = "application/json" if relpath.endswith(".json") else "application/octet-stream"
            store.client.fput_object(store.bucket, prefix + relpath, str(out / relpath),
                                     content_type=content_type)
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
        if _digest(store.get_bytes(prefix + relpath)) != expected[relpath]:
            problems.append(f"{relpath}: stored bytes differ from the manifest's")
    return problems


def materialise(settings: Settings, version_id: str, local_dir: str | Path) -> Path:
    """Download a version to ``local_dir`` in the export layout, verifying every file's digest."""
    store = ObjectStore(settings)
    prefix = version_prefix(version_id)
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not store.exists(prefix + VERSION_FILE):
        raise ExportError(f"{version_uri(settings, version_id)} has no {VERSION_FILE}: "
                          "the version does not exist or its export did not finish")
    version_data = store.get_bytes(prefix + VERSION_FILE)
    files = json.loads(version_data)["files"]
    for relpath, expected in progress(sorted(files.items()), f"download {version_id}",
                                      unit="files"):
        data = store.get_bytes(prefix + relpath)
        if _digest(data) != expected:
            raise ExportError(f"{prefix}{relpath} does not match the digest in {VERSION_FILE}")
        target = out / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    (out / VERSION_FILE).write_bytes(version_data)
    return out


def remove_export(settings: Settings, version_id: str) -> int:
    """Delete whatever an abandoned build left under the version's prefix; returns the count."""
    store = ObjectStore(settings)
    keys = list(store.list_keys(version_prefix(version_id)))
    for key in keys:
        store.remove(key)
    return len(keys)


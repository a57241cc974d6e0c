"""The export layout of a dataset version: the one contract between the dataset build, which
writes it (``dataset/build/export.py``), and everything that reads it (``modeling/``, benchmarks,
tests).

Under ``datasets/<version_id>/`` in the object store, or in a local folder holding the same files:

- ``manifest.parquet``: one row per image, columns :data:`PARQUET_SCHEMA`.
- ``labels.json``: ``{"labels": [{"label", "product_id", "name", "category_id"}], "num_classes"}``.
- ``tfrecords/<split>-<i:05d>-of-<n:05d>.tfrecord`` (:func:`shard_relpath`): ``tf.train.Example``
  records with the features :data:`ENCODED_KEY` (the photo's bytes), :data:`SHA256_KEY` and
  :data:`LABEL_KEY`, written by :func:`encode_example` and read by :func:`read_shard`.
- ``version.json``: the version's metadata and, under ``files``, the sha256 and size of every
  other file. It is written (and uploaded) last, so it is the completeness marker: a folder counts
  as a version only when version.json is there, every file it lists is present with its size (and
  digest, where asked), and every split's shards are all ``n`` of ``n`` (:func:`check_complete`).

:func:`materialise` downloads a version into a temporary folder next to the destination and
renames it into place only once every file is verified, so an interrupted download leaves nothing
that a reader accepts.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq

from shoplens.config import Settings
from shoplens.progress import progress
from shoplens.store import ObjectStore

SPLITS = ("train", "val", "test")

DATASETS_PREFIX = "datasets"
MANIFEST_FILE = "manifest.parquet"
LABELS_FILE = "labels.json"
VERSION_FILE = "version.json"
TFRECORD_DIR = "tfrecords"
LAYOUT_NAMES = frozenset({MANIFEST_FILE, LABELS_FILE, VERSION_FILE, TFRECORD_DIR})

ENCODED_KEY = "image/encoded"
SHA256_KEY = "image/sha256"
LABEL_KEY = "image/label"

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
MANIFEST_COLUMNS = tuple(PARQUET_SCHEMA.names)

_SHARD_NAME = re.compile(rf"{TFRECORD_DIR}/(?P<split>{'|'.join(SPLITS)})"
                         r"-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord")


class DatasetError(ValueError):
    """A dataset version is missing, incomplete, or not in the export layout."""


# --- names ----------------------------------------------------------------------------------


def version_prefix(version_id: str) -> str:
    return f"{DATASETS_PREFIX}/{version_id}/"


def version_uri(bucket: str, version_id: str) -> str:
    return f"s3://{bucket}/{version_prefix(version_id)}"


def shard_relpath(split: str, index: int, count: int) -> str:
    return f"{TFRECORD_DIR}/{split}-{index:05d}-of-{count:05d}.tfrecord"


def parse_shard_relpath(relpath: str) -> tuple[str, int, int] | None:
    """``(split, index, count)`` of a shard's relative path; None for any other file."""
    match = _SHARD_NAME.fullmatch(relpath)
    if match is None:
        return None
    return match["split"], int(match["index"]), int(match["count"])


# --- the files ------------------------------------------------------------------------------


def shard_ranges(split_sizes: dict[str, int], images_per_shard: int) -> dict[str, tuple[str, int, int]]:
    """Relative shard path -> ``(split, start, stop)``: which of a split's ordered records it holds.

    A split of ``k`` records is cut into ``n = ceil(k / images_per_shard)`` contiguous, near-equal
    shards, shard ``i`` holding records ``[i*k//n, (i+1)*k//n)``. The names and bounds depend on
    the split sizes only, so a shard can be planned (and written) without the other shards' rows.
    """
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be >= 1, got {images_per_shard}")
    ranges: dict[str, tuple[str, int, int]] = {}
    for split in SPLITS:
        k = split_sizes.get(split, 0)
        if k <= 0:
            continue
        n = math.ceil(k / images_per_shard)
        for i in range(n):
            ranges[shard_relpath(split, i, n)] = (split, i * k // n, (i + 1) * k // n)
    return ranges


def shard_plan(members: list[dict[str, Any]], images_per_shard: int, *,
               order_by_sha256: bool = True) -> dict[str, list[dict[str, Any]]]:
    """Relative shard path -> its records, for every split that has images.

    A split's records, ordered by sha256 (effectively a shuffle that is independent of labels) or
    kept in the given order, are cut as :func:`shard_ranges` says.
    """
    by_split: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
    for m in members:
        by_split[m["split"]].append(m)
    if order_by_sha256:
        for rows in by_split.values():
            rows.sort(key=lambda m: m["sha256"])
    sizes = {split: len(rows) for split, rows in by_split.items()}
    return {relpath: by_split[split][start:stop]
            for relpath, (split, start, stop) in shard_ranges(sizes, images_per_shard).items()}


def encode_example(data: bytes, sha256: str, label: int) -> bytes:
    """One TFRecord record: a serialised ``tf.train.Example`` with the layout's three features."""
    import tensorflow as tf

    feature = {
        ENCODED_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        SHA256_KEY: tf.train.Feature(bytes_list=tf.train.BytesList(value=[sha256.encode()])),
        LABEL_KEY: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    example = tf.train.Example(features=tf.train.Features(feature=feature))
    # Protobuf map order is unspecified unless asked for: deterministic=True sorts the keys.
    return example.SerializeToString(deterministic=True)


def feature_spec() -> dict[str, Any]:
    """The records' features as ``tf.io.parse_example`` takes them (the one reader-side spec)."""
    import tensorflow as tf

    return {ENCODED_KEY: tf.io.FixedLenFeature([], tf.string),
            SHA256_KEY: tf.io.FixedLenFeature([], tf.string),
            LABEL_KEY: tf.io.FixedLenFeature([], tf.int64)}


def read_shard(path: str | Path) -> Iterator[tuple[bytes, str, int]]:
    """``(encoded bytes, sha256, label)`` of every record of one shard, in file order."""
    import tensorflow as tf

    spec = feature_spec()
    for raw in tf.data.TFRecordDataset(str(path)):
        example = tf.io.parse_single_example(raw, spec)
        yield (example[ENCODED_KEY].numpy(), example[SHA256_KEY].numpy().decode(),
               int(example[LABEL_KEY].numpy()))


def manifest_parquet_bytes(members: list[dict[str, Any]]) -> bytes:
    """manifest.parquet of the rows; a column a row lacks is null."""
    table = pa.Table.from_pylist(members, schema=PARQUET_SCHEMA)
    sink = io.BytesIO()
    # Every option that could vary between writers is pinned; a version's file is a function of
    # its rows (and the pyarrow version, which version.json records).
    pq.write_table(table, sink, row_group_size=max(len(members), 1), compression="zstd",
                   compression_level=3, use_dictionary=True, write_statistics=True,
                   version="2.6", data_page_version="1.0", store_schema=True)
    return sink.getvalue()


def labels_document(members: list[dict[str, Any]]) -> dict[str, Any]:
    """labels.json of the rows: their labels only, ``num_classes = max label + 1``."""
    labels: dict[int, dict[str, Any]] = {}
    for m in members:
        labels.setdefault(m["label"], {"label": m["label"], "product_id": m["product_id"],
                                       "name": m["product_name"], "category_id": m["category_id"]})
    ordered = [labels[k] for k in sorted(labels)]
    return {"labels": ordered, "num_classes": (max(labels) + 1) if labels else 0}


def json_bytes(document: Any) -> bytes:
    return (json.dumps(document, ensure_ascii=False, indent=2, sort_keys=True) + "\n").encode()


def digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def file_digest(path: Path) -> dict[str, Any]:
    sha = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"sha256": sha.hexdigest(), "bytes": path.stat().st_size}


def write_shard(path: Path, records: list[dict[str, Any]], fetch: Callable[[str], bytes],
                pool: ThreadPoolExecutor, advance: Callable[[], Any] = lambda: None) -> dict[str, Any]:
    """One TFRecord shard of ``records`` (in their order) at ``path``; returns its digest.

    ``fetch`` gives an object key's bytes (run ``FETCH_THREADS`` ahead in ``pool``), checked
    against the record's sha256; ``advance`` is called once per record written.
    """
    import tensorflow as tf

    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record, data in zip(records, pool.map(lambda r: fetch(r["object_key"]), records)):
            if hashlib.sha256(data).hexdigest() != record["sha256"]:
                raise DatasetError(f"object {record['object_key']} does not hold the bytes "
                                   f"of {record['sha256']} (corrupt or replaced)")
            writer.write(encode_example(data, record["sha256"], record["label"]))
            advance()
    return file_digest(path)


def version_document(version_fields: dict[str, Any], files: dict[str, dict[str, Any]]) -> bytes:
    """version.json's bytes: ``version_fields`` and, under ``files``, every other file's digest."""
    return json_bytes({**version_fields, "files": dict(sorted(files.items()))})


def write_version_files(out_dir: Path, members: list[dict[str, Any]],
                        fetch: Callable[[str], bytes], shards: dict[str, list[dict[str, Any]]],
                        version_fields: dict[str, Any],
                        labels: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Write a version's files into ``out_dir``, version.json last; returns ``{relpath: digest}``.

    ``members`` are manifest.parquet's rows in their order, ``shards`` the records of each shard
    (:func:`shard_plan`), ``fetch`` an object key's bytes (checked against the row's sha256),
    ``version_fields`` version.json's content besides ``files``. ``labels`` defaults to
    :func:`labels_document` of the members.
    """
    files: dict[str, dict[str, Any]] = {}
    with ThreadPoolExecutor(FETCH_THREADS) as pool, \
            progress(total=len(members), desc=f"export {version_fields.get('version_id', '')}".rstrip(),
                     unit="photos") as shown:
        for relpath, records in shards.items():
            files[relpath] = write_shard(out_dir / relpath, records, fetch, pool, shown.advance)
    for relpath, data in ((MANIFEST_FILE, manifest_parquet_bytes(members)),
                          (LABELS_FILE, json_bytes(labels if labels is not None
                                                   else labels_document(members)))):
        (out_dir / relpath).write_bytes(data)
        files[relpath] = digest(data)
    files = dict(sorted(files.items()))
    version_data = version_document(version_fields, files)
    (out_dir / VERSION_FILE).write_bytes(version_data)
    return {**files, VERSION_FILE: digest(version_data)}


# --- completeness ---------------------------------------------------------------------------


def listed_files(version: Any, where: str) -> dict[str, dict[str, Any]]:
    """version.json's ``files``, checked to be safe relative paths with a size each."""
    files = version.get("files") if isinstance(version, dict) else None
    if not isinstance(files, dict):
        raise DatasetError(f"{where}: {VERSION_FILE} lists no files (not a complete export)")
    for relpath, entry in files.items():
        parts = PurePosixPath(relpath).parts
        if (not parts or PurePosixPath(relpath).is_absolute() or ".." in parts
                or relpath == VERSION_FILE or not isinstance(entry, dict)
                or not isinstance(entry.get("bytes"), int)):
            raise DatasetError(f"{where}: {VERSION_FILE} lists an invalid entry {relpath!r}")
    for required in (MANIFEST_FILE, LABELS_FILE):
        if required not in files:
            raise DatasetError(f"{where}: {VERSION_FILE} does not list {required}")
    shards: dict[str, dict[int, int]] = {}
    for relpath in files:
        if relpath.startswith(TFRECORD_DIR + "/"):
            parsed = parse_shard_relpath(relpath)
            if parsed is None:
                raise DatasetError(f"{where}: {relpath} is not a shard name of the layout")
            split, index, count = parsed
            shards.setdefault(split, {})[index] = count
    for split, found in shards.items():
        counts = set(found.values())
        count = counts.pop() if len(counts) == 1 else None
        if count is None or sorted(found) != list(range(count)):
            raise DatasetError(f"{where}: {VERSION_FILE} lists an incomplete shard set for "
                               f"{split}: {sorted(found)} of {sorted(set(found.values()))}")
    return files


def check_complete(root: str | Path, *, digests: bool = False) -> dict[str, Any]:
    """version.json's document when ``root`` holds a complete version; otherwise DatasetError
    naming what is missing. Sizes are always checked, sha256 digests when ``digests``."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a dataset version folder: no such directory")
    marker = root / VERSION_FILE
    if not marker.is_file():
        raise DatasetError(f"{root} is not a complete dataset version folder: {VERSION_FILE} "
                           "(written last) is missing, so its export or download did not finish")
    try:
        version = json.loads(marker.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{marker} is not valid JSON: {exc}") from exc
    for relpath, expected in listed_files(version, str(root)).items():
        path = root / relpath
        if not path.is_file():
            raise DatasetError(f"{root} is incomplete: {relpath} is missing")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise DatasetError(f"{root} is incomplete: {relpath} has {size} bytes, "
                               f"{VERSION_FILE} says {expected['bytes']}")
        if digests and "sha256" in expected and file_digest(path)["sha256"] != expected["sha256"]:
            raise DatasetError(f"{root}: {relpath} does not match its sha256 in {VERSION_FILE}")
    return version


def is_complete(root: str | Path, *, digests: bool = False) -> bool:
    try:
        check_complete(root, digests=digests)
        return True
    except DatasetError:
        return False


class LocalVersion:
    """A complete version folder (checked on opening): its version.json, labels and shards."""

    def __init__(self, root: str | Path, *, digests: bool = False):
        self.root = Path(root)
        self.version: dict[str, Any] = check_complete(self.root, digests=digests)
        self.files: dict[str, dict[str, Any]] = self.version["files"]
        try:
            labels = json.loads((self.root / LABELS_FILE).read_bytes())
            self.labels: list[dict] = sorted(labels["labels"], key=lambda e: e["label"])
            self.num_classes = int(labels.get("num_classes", len(self.labels)))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DatasetError(f"{self.root}/{LABELS_FILE} is not a labels document: {exc}") from exc

    @property
    def version_id(self) -> str:
        return str(self.version.get("version_id") or self.root.name)

    def shard_files(self, split: str) -> list[Path]:
        """The split's shards that version.json lists, in shard order."""
        indexed = sorted((parsed[1], relpath) for relpath in self.files
                         if (parsed := parse_shard_relpath(relpath)) and parsed[0] == split)
        return [self.root / relpath for _, relpath in indexed]

    def records(self, split: str) -> Iterator[tuple[bytes, str, int]]:
        """``(encoded, sha256, label)`` of every photo of a split, in shard order."""
        for shard in self.shard_files(split):
            yield from read_shard(shard)


# --- local folders, written and downloaded atomically ---------------------------------------

T = TypeVar("T")


def _check_replaceable(dest: Path) -> None:
    """A destination may be replaced when it is absent, empty, or an incomplete or damaged
    version folder (only layout names in it); anything else is someone's data and is left alone."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise DatasetError(f"{dest} exists and is not a directory")
    others = sorted(p.name for p in dest.iterdir() if p.name not in LAYOUT_NAMES)
    if others:
        raise DatasetError(f"{dest} exists and holds files that are not part of a dataset "
                           f"version ({', '.join(others[:3])}); refusing to replace it")
    if is_complete(dest, digests=True):
        raise DatasetError(f"{dest} already holds a complete dataset version "
                           f"({json.loads((dest / VERSION_FILE).read_bytes()).get('version_id')}); "
                           "choose another folder")


def write_folder_atomically(dest: str | Path, write: Callable[[Path], T]) -> T:
    """Run ``write(tmp)`` on a fresh folder next to ``dest``, then rename it to ``dest``.

    The folder appears whole or not at all: an exception (or a killed process) leaves at most a
    hidden ``.<name>.part-*`` sibling, never a partial ``dest``. An incomplete ``dest`` is
    replaced; a complete one that another process renamed into place first is kept.
    """
    dest = Path(dest)
    _check_replaceable(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.part-", dir=dest.parent))
    try:
        result = write(tmp)
        check_complete(tmp)
        if dest.exists():
            if is_complete(dest, digests=True):  # another process renamed its copy in first
                return result
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            shutil.rmtree(old, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not is_complete(dest):  # not a concurrent writer that just finished first
                raise
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def materialise(settings: Settings, version_id: str, local_dir: str | Path) -> Path:
    """``datasets/<version_id>/`` from the object store as the folder ``local_dir``.

    A complete copy of the version already there (every digest checked) is used as is; an
    incomplete one is downloaded again. Every file is checked against version.json's digest,
    and the folder only appears, by an atomic rename, once all of them are in.
    """
    dest = Path(local_dir)
    if is_complete(dest, digests=True):
        found = json.loads((dest / VERSION_FILE).read_bytes()).get("version_id")
        if found == version_id:
            return dest
    store = ObjectStore(settings)
    prefix = version_prefix(version_id)
    where = version_uri(settings.s3_bucket, version_id)
    if not store.exists(prefix + VERSION_FILE):
        raise DatasetError(f"{where} has no {VERSION_FILE}: the version does not exist or its "
                           "export did not finish")
    version_data = store.get_bytes(prefix + VERSION_FILE)
    try:
        files = listed_files(json.loads(version_data), where)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{where}{VERSION_FILE} is not valid JSON: {exc}") from exc

    def download(tmp: Path) -> None:
        for relpath, expected in progress(sorted(files.items()), f"download {version_id}",
                                          unit="files"):
            data = store.get_bytes(prefix + relpath)
            got = digest(data)
            if got["bytes"] != expected["bytes"] or got["sha256"] != expected.get("sha256",
                                                                                  got["sha256"]):
                raise DatasetError(f"{where}{relpath} does not match its digest in {VERSION_FILE}")
            target = tmp / relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        (tmp / VERSION_FILE).write_bytes(version_data)  # the marker goes last

    write_folder_atomically(dest, download)
    return dest


def upload_version(store: ObjectStore, version_id: str, folder: Path) -> None:
    """Upload a version folder to ``datasets/<version_id>/``, version.json last, so a reader
    that finds version.json in the store finds every file it lists."""
    prefix = version_prefix(version_id)
    files = listed_files(json.loads((folder / VERSION_FILE).read_bytes()), str(folder))
    for relpath in progress(sorted(files) + [VERSION_FILE], f"upload {version_id}", unit="files"):
        content_type = "application/json" if relpath.endswith(".json") else "application/octet-stream"
        store.client.fput_object(store.bucket, prefix + relpath, str(folder / relpath),
                                 content_type=content_type)

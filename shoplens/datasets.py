"""A dataset version for any framework, streamed: ``tf.data`` over the version's TFRecord shards
(:func:`load_version`), and on-demand exports with the image bytes for Hugging Face ``datasets``
(Parquet, :func:`export_parquet`) and a PyTorch ``DataLoader`` (WebDataset-style tar shards,
:func:`export_webdataset`).

Everything reads the export layout of :mod:`shoplens.export_layout` (its file names, its one
feature spec, its completeness rule) one shard at a time, so memory stays bounded by a shard, never
a split. The exports are derived from a complete local version and mirror its shards
(``<split>-<i:05d>-of-<n:05d>.parquet`` / ``.tar``); each file appears by an atomic rename, so an
interrupted export leaves no file a reader would take for whole.

They are made on demand (``python -m dataset build --materialise V --out D --parquet P``) instead
of by every nightly build: the TFRecords are what training reads, and storing every photo's bytes
a second (and third) time in each version would double the store's size for readers who may never
come.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from shoplens.config import Settings
from shoplens.export_layout import (ENCODED_KEY, LABEL_KEY, MANIFEST_FILE, SHA256_KEY, SPLITS,
                                    DatasetError, LocalVersion, feature_spec, materialise,
                                    parse_shard_relpath, read_shard)

__all__ = ["DEFAULT_CACHE_DIR", "PARQUET_WITH_BYTES_SCHEMA", "export_parquet", "export_webdataset",
           "load_version", "open_version"]

DEFAULT_CACHE_DIR = "~/.cache/shoplens/datasets"

# Column ``image`` is the struct Hugging Face's Image feature stores; the schema metadata below
# tells ``datasets`` so, and it decodes the column to PIL images on access.
PARQUET_WITH_BYTES_SCHEMA = pa.schema([
    ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
    ("label", pa.int32()),
    ("product_id", pa.int64()),
    ("sha256", pa.string()),
    ("split", pa.string()),
]).with_metadata({"huggingface": json.dumps({"info": {"features": {
    "image": {"_type": "Image"},
    "label": {"dtype": "int32", "_type": "Value"},
    "product_id": {"dtype": "int64", "_type": "Value"},
    "sha256": {"dtype": "string", "_type": "Value"},
    "split": {"dtype": "string", "_type": "Value"},
}}}, sort_keys=True)})

PARSE_BATCH = 64  # records parsed together by load_version (about one MiB of 15 KB photos)
PARQUET_ROW_GROUP = 64  # rows per row group: what a Parquet reader holds in memory at once

_EXTENSIONS = {"jpeg": "jpg"}


def open_version(version: str | Path | LocalVersion, *, settings: Settings | None = None,
                 cache_dir: str | Path | None = None) -> LocalVersion:
    """A complete local version: an opened one as is, a folder in the layout, or (with
    ``settings``) a version id downloaded from the object store into ``cache_dir/<version>``
    (a complete earlier download is reused, every digest checked)."""
    if isinstance(version, LocalVersion):
        return version
    path = Path(version)
    if path.is_dir():
        return LocalVersion(path)
    if settings is None:
        raise DatasetError(f"{version} is not a dataset version folder; pass settings to "
                           "download a version id from the object store")
    cache = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
    return LocalVersion(materialise(settings, str(version), cache / str(version)))


def _split_shards(local: LocalVersion, split: str) -> list[Path]:
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; the layout's splits are {', '.join(SPLITS)}")
    shards = local.shard_files(split)
    if not shards:
        raise DatasetError(f"version {local.version_id} has no {split} shards")
    return shards


def _decode_to_array(encoded) -> Any:
    """The one photo decoder (EXIF-upright RGB, every phone format) as a uint8 HxWx3 array."""
    import numpy as np

    from shoplens.photos import decode_photo

    return np.asarray(decode_photo(encoded.numpy()).image, dtype=np.uint8)


def load_version(version: str | Path | LocalVersion, split: str, *, settings: Settings | None = None,
                 cache_dir: str | Path | None = None, decode: bool = False,
                 batch_size: int | None = None, num_parallel_reads: int | None = None):
    """A streaming ``tf.data.Dataset`` of a split: ``{"image", "label", "sha256"}`` per photo.

    ``version``: a version folder (or an opened :class:`LocalVersion`), or a version id that is
    downloaded with ``settings`` first (see :func:`open_version`). The split's shards are read
    lazily by ``TFRecordDataset`` and parsed with the layout's feature spec, so only the reader's
    buffers are in memory, never the split. ``image`` is the encoded bytes (tf.string), or with
    ``decode`` an upright RGB uint8 tensor of shape (H, W, 3) from the project's photo decoder.
    ``label`` is int64, ``sha256`` a hex string. With ``batch_size`` the elements are batches
    (vectors of encoded images, labels and sha256; not with ``decode``, whose images differ in
    size: resize, then batch). Records come in shard order (within a shard, by sha256) unless
    ``num_parallel_reads`` interleaves shards. Photo by photo, the stream carries tf.data's
    ``inject_prefetch = False`` option (photos cross threads only in parsed batches); a
    ``prefetch`` added after your own per-photo work is yours to add.
    """
    import tensorflow as tf

    if decode and batch_size:
        raise ValueError("decode=True yields images of different sizes: map a resize over the "
                         "dataset, then batch it, instead of passing batch_size")
    files = [str(p) for p in _split_shards(open_version(version, settings=settings,
                                                        cache_dir=cache_dir), split)]
    spec = feature_spec()

    def parse(raw):  # a batch of records at once: the parser's cost per record drops severalfold
        example = tf.io.parse_example(raw, spec)
        return {"image": example[ENCODED_KEY], "label": example[LABEL_KEY],
                "sha256": example[SHA256_KEY]}

    def decode_image(element):
        image = tf.py_function(_decode_to_array, [element["image"]], tf.uint8)
        image.set_shape([None, None, 3])
        return {**element, "image": image}

    dataset = tf.data.TFRecordDataset(files, num_parallel_reads=num_parallel_reads)
    dataset = dataset.batch(batch_size or PARSE_BATCH).map(
        parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # Prefetched as parsed batches: handing single photos between threads cost more than the
    # parse (a full pass ran at 0.7x the raw records with a prefetch after unbatch, the one
    # tf.data injects included; as batches, at the raw records' speed).
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    if batch_size:
        return dataset
    dataset = dataset.unbatch()
    if decode:  # decoding costs far more than a hand-over: decoded photos are prefetched
        return dataset.map(decode_image, num_parallel_calls=tf.data.AUTOTUNE,
                           deterministic=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.experimental_optimization.inject_prefetch = False
    return dataset.with_options(options)


# --- exports with the bytes -----------------------------------------------------------------


def _image_facts(local: LocalVersion) -> dict[str, tuple[int, str]]:
    """sha256 -> (product_id, file extension), from manifest.parquet (no bytes in it); a photo
    without a recorded format gets the extension ``bin``."""
    table = pq.read_table(local.root / MANIFEST_FILE, columns=["sha256", "product_id", "format"])
    return {sha: (product_id, _EXTENSIONS.get(fmt or "", fmt or "bin"))
            for sha, product_id, fmt in zip(*(table.column(c).to_pylist()
                                              for c in table.column_names))}


def _records(local: LocalVersion, shard: Path, split: str,
             facts: dict[str, tuple[int, str]]) -> Iterator[dict[str, Any]]:
    """One shard's photos as export rows."""
    by_label = {e["label"]: int(e["product_id"]) for e in local.labels}
    for data, sha256, label in read_shard(shard):
        product_id, ext = facts.get(sha256, (by_label.get(label), "bin"))
        yield {"data": data, "sha256": sha256, "label": label, "product_id": product_id,
               "split": split, "name": f"{sha256}.{ext}"}


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` next to ``target``, renamed into place only when it returned."""
    tmp = target.with_name(f".{target.name}.part")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _export(version, out_dir, splits, suffix: str, write_shard, settings, cache_dir) -> list[Path]:
    local = open_version(version, settings=settings, cache_dir=cache_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    facts = _image_facts(local)
    written = []
    for split in splits:
        for shard in _split_shards(local, split):
            parsed = parse_shard_relpath(f"tfrecords/{shard.name}")
            assert parsed is not None  # shard_files only lists layout names
            target = out / f"{split}-{parsed[1]:05d}-of-{parsed[2]:05d}.{suffix}"
            _write_atomically(target, lambda tmp: write_shard(tmp, _records(local, shard, split, facts)))
            written.append(target)
    return written


def _write_parquet_shard(path: Path, records: Iterator[dict[str, Any]]) -> None:
    def table(rows):
        return pa.Table.from_pylist([
            {"image": {"bytes": r["data"], "path": r["name"]}, "label": r["label"],
             "product_id": r["product_id"], "sha256": r["sha256"], "split": r["split"]}
            for r in rows], schema=PARQUET_WITH_BYTES_SCHEMA)

    # Images are already compressed: no codec, pinned options so the file is a function of the
    # shard; rows are flushed a row group at a time so memory stays at one group.
    with pq.ParquetWriter(path, PARQUET_WITH_BYTES_SCHEMA, compression="none", version="2.6",
                          use_dictionary=["split"], write_statistics=["label", "product_id"],
                          store_schema=True) as writer:
        rows = []
        for record in records:
            rows.append(record)
            if len(rows) == PARQUET_ROW_GROUP:
                writer.write_table(table(rows), row_group_size=PARQUET_ROW_GROUP)
                rows = []
        if rows:
            writer.write_table(table(rows), row_group_size=PARQUET_ROW_GROUP)


def _write_tar_shard(path: Path, records: Iterator[dict[str, Any]]) -> None:
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0: the tar is a function of the shard
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for r in records:
            meta = {"label": r["label"], "product_id": r["product_id"], "sha256": r["sha256"],
                    "split": r["split"], "image": r["name"]}
            add(tar, r["name"], r["data"])
            add(tar, f"{r['sha256']}.cls", f"{r['label']}\n".encode())
            add(tar, f"{r['sha256']}.json", json.dumps(meta, sort_keys=True).encode())


def export_parquet(version: str | Path | LocalVersion, out_dir: str | Path, *,
                   splits: tuple[str, ...] = SPLITS, settings: Settings | None = None,
                   cache_dir: str | Path | None = None) -> list[Path]:
    """Parquet files with the image bytes, one per TFRecord shard, into ``out_dir``.

    Columns :data:`PARQUET_WITH_BYTES_SCHEMA`: ``image`` {bytes, path} (Hugging Face's Image
    feature), ``label``, ``product_id``, ``sha256``, ``split``; ``datasets.load_dataset("parquet",
    data_files=...)`` reads them directly. Returns the files written."""
    return _export(version, out_dir, splits, "parquet", _write_parquet_shard, settings, cache_dir)


def export_webdataset(version: str | Path | LocalVersion, out_dir: str | Path, *,
                      splits: tuple[str, ...] = SPLITS, settings: Settings | None = None,
                      cache_dir: str | Path | None = None) -> list[Path]:
    """WebDataset-style tar shards, one per TFRecord shard, into ``out_dir``: per photo
    ``<sha256>.<ext>`` (its bytes), ``<sha256>.cls`` (the label) and ``<sha256>.json`` (label,
    product_id, sha256, split, image member name), readable with the stdlib ``tarfile``.
    Returns the files written."""
    return _export(version, out_dir, splits, "tar", _write_tar_shard, settings, cache_dir)

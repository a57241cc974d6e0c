"""Reading (and, for benchmarks and tests, writing) a dataset version in its exported layout.

The layout is the dataset build's contract (object-store prefix ``datasets/<version_id>/``, or a
local folder with the same files)::

    manifest.parquet   sha256, object_key, label, product_id, product_name, category_id, split, ...
    labels.json        {"labels": [{"label", "product_id", "name", "category_id"}], "num_classes"}
    version.json       provenance of the version
    tfrecords/<split>-<i:05d>-of-<n:05d>.tfrecord
                       image/encoded (bytes), image/sha256 (bytes), image/label (int64)
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoplens.config import Settings

SPLITS = ("train", "val", "test")


class DatasetError(ValueError):
    """A dataset version is missing or not in the expected layout."""


@dataclass
class Split:
    sha256: list[str]
    labels: np.ndarray  # int32
    encoded: list[bytes]

    def __len__(self) -> int:
        return len(self.labels)


class LocalDataset:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        for required in ("labels.json", "manifest.parquet"):
            if not (self.root / required).is_file():
                raise DatasetError(f"{self.root} is not a dataset version folder: "
                                   f"{required} is missing")
        labels = json.loads((self.root / "labels.json").read_text())
        self.labels: list[dict] = sorted(labels["labels"], key=lambda e: e["label"])
        self.num_classes = int(labels.get("num_classes", len(self.labels)))
        if [e["label"] for e in self.labels] != list(range(self.num_classes)):
            raise DatasetError(f"{self.root}/labels.json: labels must be 0..num_classes-1")
        version_file = self.root / "version.json"
        self.version = json.loads(version_file.read_text()) if version_file.is_file() else {}

    @property
    def version_id(self) -> str:
        return str(self.version.get("version_id") or self.version.get("id") or self.root.name)

    def shard_files(self, split: str) -> list[Path]:
        return sorted((self.root / "tfrecords").glob(f"{split}-*.tfrecord"))

    def load_split(self, split: str) -> Split:
        """Every photo of a split, in shard order (deterministic)."""
        import tensorflow as tf

        features = {
            "image/encoded": tf.io.FixedLenFeature([], tf.string),
            "image/sha256": tf.io.FixedLenFeature([], tf.string),
            "image/label": tf.io.FixedLenFeature([], tf.int64),
        }
        shas, labels, encoded = [], [], []
        for shard in self.shard_files(split):
            for raw in tf.data.TFRecordDataset(str(shard)):
                ex = tf.io.parse_single_example(raw, features)
                encoded.append(ex["image/encoded"].numpy())
                shas.append(ex["image/sha256"].numpy().decode())
                labels.append(int(ex["image/label"].numpy()))
        bad = [lab for lab in labels if not 0 <= lab < self.num_classes]
        if bad:
            raise DatasetError(f"{split} split has labels outside 0..{self.num_classes - 1}: "
                               f"{sorted(set(bad))[:5]}")
        return Split(shas, np.asarray(labels, dtype=np.int32), encoded)


def open_dataset(settings: Settings, version_or_dir: str, work_dir: Path) -> LocalDataset:
    """A local directory in the layout as is; otherwise the version downloaded from the store."""
    path = Path(version_or_dir)
    if path.is_dir():
        return LocalDataset(path)
    target = work_dir / "datasets" / version_or_dir
    if not (target / "labels.json").is_file():
        materialise(settings, version_or_dir, target)
    return LocalDataset(target)


def materialise(settings: Settings, version_id: str, local_dir: Path) -> None:
    """Download ``datasets/<version_id>/`` (the dataset stage's exporter when it is installed)."""
    try:
        from dataset.build.export import materialise as dataset_materialise
    except ImportError:
        dataset_materialise = None
    if dataset_materialise is not None:
        dataset_materialise(settings, version_id, local_dir)
        return
    from shoplens.store import ObjectStore

    store = ObjectStore(settings)
    prefix = f"datasets/{version_id}/"
    keys = list(store.list_keys(prefix))
    if not any(k == prefix + "labels.json" for k in keys):
        raise DatasetError(f"dataset version {version_id!r} not found in the object store "
                           f"(no {prefix}labels.json in bucket {settings.s3_bucket!r})")
    for key in keys:
        _atomic_write(local_dir / key[len(prefix):], store.get_bytes(key))


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def write_local_dataset(root: str | Path, version_id: str, labels: list[dict],
                        photos: list[tuple[bytes, int, str]], shard_size: int = 500) -> Path:
    """Write a dataset version folder from (encoded bytes, label, split) triples.

    For benchmarks and tests that start from photos on disk instead of a built version.
    """
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq
    import tensorflow as tf

    root = Path(root)
    (root / "tfrecords").mkdir(parents=True, exist_ok=True)
    by_label = {e["label"]: e for e in labels}
    rows = []
    for split in SPLITS:
        items = [(data, label) for data, label, s in photos if s == split]
        n_shards = max(1, -(-len(items) // shard_size))
        for i in range(n_shards):
            path = root / "tfrecords" / f"{split}-{i:05d}-of-{n_shards:05d}.tfrecord"
            with tf.io.TFRecordWriter(str(path)) as writer:
                for data, label in items[i * shard_size:(i + 1) * shard_size]:
                    sha = hashlib.sha256(data).hexdigest()
                    ex = tf.train.Example(features=tf.train.Features(feature={
                        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
                        "image/sha256": tf.train.Feature(bytes_list=tf.train.BytesList(value=[sha.encode()])),
                        "image/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
                    }))
                    writer.write(ex.SerializeToString())
                    entry = by_label[label]
                    rows.append({"sha256": sha, "object_key": f"images/{sha[:2]}/{sha}.jpg",
                                 "label": label, "product_id": int(entry["product_id"]),
                                 "product_name": entry["name"],
                                 "category_id": str(entry.get("category_id", "")), "split": split})
    table = pa.table({
        "sha256": [r["sha256"] for r in rows], "object_key": [r["object_key"] for r in rows],
        "label": pa.array([r["label"] for r in rows], pa.int32()),
        "product_id": pa.array([r["product_id"] for r in rows], pa.int64()),
        "product_name": [r["product_name"] for r in rows],
        "category_id": [r["category_id"] for r in rows], "split": [r["split"] for r in rows],
    })
    pq.write_table(table, root / "manifest.parquet")
    (root / "labels.json").write_text(json.dumps(
        {"labels": labels, "num_classes": len(labels)}, ensure_ascii=False, indent=1))
    (root / "version.json").write_text(json.dumps({"version_id": version_id}))
    return root

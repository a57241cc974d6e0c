"""The modeling stage's view of a dataset version in its export layout (the contract of
:mod:`shoplens.export_layout`): a complete local folder, or a version downloaded from the store,
read into memory split by split; and, for benchmarks and tests, a version folder written from
photos on disk through the contract's writer.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoplens.config import Settings
from shoplens.export_layout import (SPLITS, DatasetError, LocalVersion, materialise, shard_plan,
                                    write_folder_atomically, write_version_files)
from shoplens.store import image_key

__all__ = ["SPLITS", "DatasetError", "LocalDataset", "Split", "open_dataset", "write_local_dataset"]


@dataclass
class Split:
    sha256: list[str]
    labels: np.ndarray  # int32
    encoded: list[bytes]

    def __len__(self) -> int:
        return len(self.labels)


class LocalDataset(LocalVersion):
    """A complete version folder (checked on opening) whose labels are 0..num_classes-1."""

    def __init__(self, root: str | Path, *, digests: bool = False):
        super().__init__(root, digests=digests)
        if [e["label"] for e in self.labels] != list(range(self.num_classes)):
            raise DatasetError(f"{self.root}/labels.json: labels must be 0..num_classes-1")

    def load_split(self, split: str) -> Split:
        """Every photo of a split, in shard order (deterministic), in memory: for training, which
        decodes and revisits every photo each epoch. A reader that passes over a split once
        streams it instead (:func:`shoplens.datasets.load_version`)."""
        shas, labels, encoded = [], [], []
        for data, sha256, label in self.records(split):
            encoded.append(data)
            shas.append(sha256)
            labels.append(label)
        bad = [lab for lab in labels if not 0 <= lab < self.num_classes]
        if bad:
            raise DatasetError(f"{split} split has labels outside 0..{self.num_classes - 1}: "
                               f"{sorted(set(bad))[:5]}")
        return Split(shas, np.asarray(labels, dtype=np.int32), encoded)


def open_dataset(settings: Settings, version_or_dir: str, work_dir: Path) -> LocalDataset:
    """A local directory in the layout as is; otherwise the version downloaded from the store
    into ``work_dir/datasets/<version>`` (a complete earlier download is reused, an incomplete
    one downloaded again)."""
    path = Path(version_or_dir)
    if path.is_dir():
        return LocalDataset(path)
    return LocalDataset(materialise(settings, version_or_dir, work_dir / "datasets" / version_or_dir))


def write_local_dataset(root: str | Path, version_id: str, labels: list[dict],
                        photos: list[tuple[bytes, int, str]], shard_size: int = 500) -> Path:
    """Write a dataset version folder from (encoded bytes, label, split) triples.

    For benchmarks and tests that start from photos on disk instead of a built version. Records
    keep the photos' order within each split; the folder appears whole or not at all.
    """
    by_label = {e["label"]: e for e in labels}
    by_key: dict[str, bytes] = {}
    members = []
    for split in SPLITS:
        for data, label, photo_split in photos:
            if photo_split != split:
                continue
            sha = hashlib.sha256(data).hexdigest()
            key = image_key(sha, "jpeg")
            by_key[key] = data
            entry = by_label[label]
            members.append({"sha256": sha, "object_key": key, "label": label,
                            "product_id": int(entry["product_id"]), "product_name": entry["name"],
                            "category_id": str(entry.get("category_id", "")), "split": split})
    shards = shard_plan(members, shard_size, order_by_sha256=False)
    labels_doc = {"labels": labels, "num_classes": len(labels)}
    write_folder_atomically(root, lambda out: write_version_files(
        out, members, by_key.__getitem__, shards, {"version_id": version_id}, labels_doc))
    return Path(root)

"""The export-layout contract (shoplens/export_layout.py) as the modeling stage meets it: a version
folder counts only when version.json, written last, lists files that are all there; a download
appears whole or not at all, and whatever is incomplete is fetched again, never trusted."""
from __future__ import annotations

import hashlib
import json

import pytest

from modeling.dataset_layout import LocalDataset, open_dataset, write_local_dataset
from shoplens import export_layout as layout
from shoplens.export_layout import DatasetError
from shoplens.store import ObjectStore

LABELS = [{"label": i, "product_id": 700 + i, "name": f"product {i}", "category_id": "16220000"}
          for i in range(2)]


def photos(per_split=(5, 2, 2)) -> list[tuple[bytes, int, str]]:
    """Distinct byte strings stand in for photos: the layout stores bytes, it does not decode."""
    out = []
    for split, n in zip(layout.SPLITS, per_split):
        for label in (0, 1):
            out += [(f"{split}-{label}-{i}".encode() * 50, label, split) for i in range(n)]
    return out


def version_folder(root, version_id="v0042", shard_size=2):
    """A version folder with several shards per split (train: 10 photos in 5 shards)."""
    return write_local_dataset(root / version_id, version_id, LABELS, photos(), shard_size)


@pytest.fixture
def stored_version(s3_settings, tmp_path):
    """A version uploaded to the store the way the build publishes it (version.json last)."""
    source = version_folder(tmp_path / "source")
    layout.upload_version(ObjectStore(s3_settings), "v0042", source)
    return s3_settings, source


def shard_names(root, split="train") -> list[str]:
    return sorted(p.name for p in (root / "tfrecords").glob(f"{split}-*.tfrecord"))


def test_writer_and_reader_share_the_record_format_and_shard_names(tmp_path):
    """What write_local_dataset writes through the contract, LocalDataset reads back in order,
    and version.json lists every file with its size and sha256."""
    root = version_folder(tmp_path)

    dataset = LocalDataset(root, digests=True)

    train = dataset.load_split("train")
    expected = [(data, label) for data, label, split in photos() if split == "train"]
    assert list(zip(train.encoded, train.labels.tolist())) == expected
    assert train.sha256 == [hashlib.sha256(d).hexdigest() for d, _ in expected]
    assert shard_names(root) == [f"train-{i:05d}-of-00005.tfrecord" for i in range(5)]
    listed = json.loads((root / layout.VERSION_FILE).read_text())["files"]
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}
    assert set(listed) == on_disk - {layout.VERSION_FILE}
    assert listed["labels.json"] == layout.file_digest(root / "labels.json")


def test_a_missing_shard_is_detected_with_a_clear_error(tmp_path):
    """A folder whose version.json lists a shard that is gone is not opened: the error names it."""
    root = version_folder(tmp_path)
    (root / "tfrecords" / "train-00003-of-00005.tfrecord").unlink()

    with pytest.raises(DatasetError, match=r"incomplete: tfrecords/train-00003-of-00005\.tfrecord "
                                           r"is missing"):
        LocalDataset(root)


def test_a_truncated_file_is_detected_by_its_size(tmp_path):
    root = version_folder(tmp_path)
    shard = root / "tfrecords" / "val-00000-of-00002.tfrecord"
    shard.write_bytes(shard.read_bytes()[:-7])

    with pytest.raises(DatasetError, match=r"val-00000-of-00002\.tfrecord has \d+ bytes, "
                                           r"version.json says \d+"):
        LocalDataset(root)


@pytest.mark.parametrize("edit, message", [
    (lambda files: files.pop("tfrecords/train-00004-of-00005.tfrecord"), "incomplete shard set"),
    (lambda files: files.pop("manifest.parquet"), "does not list manifest.parquet"),
    (lambda files: files.__setitem__("../outside", {"sha256": "0" * 64, "bytes": 1}),
     "invalid entry '../outside'"),
    (lambda files: files.__setitem__("tfrecords/train-7.tfrecord", {"sha256": "0" * 64, "bytes": 1}),
     "not a shard name"),
])
def test_a_version_json_that_lists_an_inconsistent_layout_is_rejected(tmp_path, edit, message):
    """version.json itself is checked: every split's shards are n of n, the fixed files are listed,
    and no entry points outside the folder."""
    root = version_folder(tmp_path)
    marker = root / layout.VERSION_FILE
    version = json.loads(marker.read_text())
    edit(version["files"])
    marker.write_text(json.dumps(version))

    with pytest.raises(DatasetError, match=message):
        layout.check_complete(root)


def test_an_interrupted_materialise_leaves_no_folder_that_open_dataset_accepts(
        stored_version, tmp_path, monkeypatch):
    """The connection drops after labels.json, manifest.parquet and one shard came in: nothing
    is left that passes for the version, and the next open downloads it whole."""
    settings, source = stored_version
    real_get = ObjectStore.get_bytes
    calls = []

    def get_then_drop(store, key):
        calls.append(key)
        if len(calls) > 4:  # version.json, labels.json, manifest.parquet, the first shard
            raise ConnectionError("connection reset by peer")
        return real_get(store, key)

    monkeypatch.setattr(ObjectStore, "get_bytes", get_then_drop)
    work = tmp_path / "work"
    with pytest.raises(ConnectionError):
        open_dataset(settings, "v0042", work)
    monkeypatch.undo()

    target = work / "datasets" / "v0042"
    with pytest.raises(DatasetError):
        LocalDataset(target)
    assert [p.name for p in (work / "datasets").iterdir()] == []  # no partial temp folder either

    dataset = open_dataset(settings, "v0042", work)
    assert dataset.root == target
    assert dataset.load_split("train").sha256 == LocalDataset(source).load_split("train").sha256


def test_a_partial_folder_left_by_a_killed_download_is_downloaded_again(stored_version, tmp_path):
    """What a download killed mid-way used to leave (labels.json and the manifest, no shards, no
    version.json) is not trusted: open_dataset replaces it with the whole version."""
    settings, source = stored_version
    target = tmp_path / "work" / "datasets" / "v0042"
    target.mkdir(parents=True)
    for name in ("labels.json", "manifest.parquet"):
        (target / name).write_bytes((source / name).read_bytes())

    dataset = open_dataset(settings, "v0042", tmp_path / "work")

    assert len(dataset.load_split("train")) == 10
    assert shard_names(target) == shard_names(source)


@pytest.mark.parametrize("damage", ["delete", "flip a byte"])
def test_a_damaged_cached_download_is_downloaded_again(stored_version, tmp_path, damage):
    """A cached copy is reused only when every file matches version.json's sha256."""
    settings, source = stored_version
    target = layout.materialise(settings, "v0042", tmp_path / "v0042")
    shard = target / "tfrecords" / "test-00001-of-00002.tfrecord"
    if damage == "delete":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))

    layout.materialise(settings, "v0042", target)

    assert shard.read_bytes() == (source / "tfrecords" / shard.name).read_bytes()
    layout.check_complete(target, digests=True)


def test_a_stored_file_that_does_not_match_its_digest_is_refused_and_nothing_appears(
        stored_version, tmp_path):
    settings, _ = stored_version
    ObjectStore(settings).put_bytes("datasets/v0042/tfrecords/val-00001-of-00002.tfrecord", b"junk")

    with pytest.raises(DatasetError, match=r"val-00001-of-00002\.tfrecord does not match its "
                                           r"digest in version\.json"):
        layout.materialise(settings, "v0042", tmp_path / "downloads" / "v0042")
    assert list((tmp_path / "downloads").iterdir()) == []  # neither the folder nor a temp one


def test_a_version_without_version_json_in_the_store_is_not_downloaded(s3_settings, tmp_path):
    """An export that stopped before its last upload (version.json) does not exist for readers."""
    ObjectStore(s3_settings).put_bytes("datasets/v0043/labels.json", b'{"labels": []}')

    with pytest.raises(DatasetError, match="has no version.json"):
        layout.materialise(s3_settings, "v0043", tmp_path / "v0043")
    assert not (tmp_path / "v0043").exists()


def test_materialise_never_replaces_a_folder_holding_other_files(stored_version, tmp_path):
    """Bad input loses nothing: a destination with files that are not a version stays as it was."""
    settings, _ = stored_version
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")

    with pytest.raises(DatasetError, match="notes.txt"):
        layout.materialise(settings, "v0042", target)
    assert [p.name for p in target.iterdir()] == ["notes.txt"]

"""A dataset version streamed to any framework (shoplens/datasets.py): ``load_version`` is a
``tf.data`` pipeline over the split's TFRecord shards that yields what the contract wrote; the
Parquet and tar exports carry the image bytes in files Hugging Face ``datasets`` and a PyTorch
``DataLoader`` read directly; and the examples in docs/manifest.md run as written."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from build_fixtures import ManifestWriter, jpeg_bytes, migrate_for_build
from modeling.dataset_layout import LocalDataset, write_local_dataset
from shoplens import datasets, export_layout as layout
from shoplens.datasets import export_parquet, export_webdataset, load_version
from shoplens.export_layout import DatasetError
from shoplens.store import ObjectStore

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "manifest.md"
LABELS = [{"label": i, "product_id": 900 + i, "name": f"product {i}", "category_id": "16220000"}
          for i in range(3)]


def photos(per_split=(7, 3, 2)) -> list[tuple[bytes, int, str]]:
    """Real little JPEGs (distinct seeds), labels cycling over the three products."""
    out, seed = [], 0
    for split, n in zip(layout.SPLITS, per_split):
        for i in range(n):
            seed += 1
            out.append((jpeg_bytes(seed, 12 + seed % 5), i % 3, split))
    return out


def version(root: Path, version_id="v0003", shard_size=3, per_split=(7, 3, 2)) -> Path:
    """A version folder with several shards per split (train: 7 photos in 3 shards)."""
    return write_local_dataset(root / version_id, version_id, LABELS, photos(per_split), shard_size)


def streamed(dataset) -> list[tuple[bytes, int, str]]:
    return [(e["image"], int(e["label"]), e["sha256"].decode())
            for e in dataset.as_numpy_iterator()]


def test_load_version_streams_each_split_as_the_contract_wrote_it(tmp_path):
    """Every split comes back photo for photo in shard order: the bytes, label and sha256 that
    the in-memory reader (LocalDataset.load_split) returns, read from the split's shards."""
    root = version(tmp_path)
    for split in layout.SPLITS:
        whole = LocalDataset(root).load_split(split)
        expected = list(zip(whole.encoded, whole.labels.tolist(), whole.sha256))
        assert streamed(load_version(root, split)) == expected
        assert len(expected) == sum(1 for *_, s in photos() if s == split)


def test_batch_size_yields_the_same_photos_in_batches(tmp_path):
    """batch_size gives vectors of images, labels and sha256 that concatenate to the
    photo-by-photo stream; with decode (images of different sizes) it is refused."""
    root = version(tmp_path)
    batches = list(load_version(root, "train", batch_size=3).as_numpy_iterator())
    assert [len(b["label"]) for b in batches] == [3, 3, 1]
    flat = [(img, int(lab), sha.decode()) for b in batches
            for img, lab, sha in zip(b["image"], b["label"], b["sha256"])]
    assert flat == streamed(load_version(root, "train"))
    with pytest.raises(ValueError, match="resize"):
        load_version(root, "train", decode=True, batch_size=3)


def test_photos_cross_threads_in_parsed_batches_not_one_by_one(tmp_path):
    """The photo-by-photo stream is unbatched in the reader's own thread: tf.data is told not
    to inject a prefetch after it (handing single photos between threads made a full pass run
    at 0.7x the raw records: benchmarks/dataset_stream.py). Decoded photos, whose decoding
    dwarfs a hand-over, are still prefetched one by one."""
    root = version(tmp_path)
    photo_by_photo = load_version(root, "train")
    assert photo_by_photo.options().experimental_optimization.inject_prefetch is False
    assert "Prefetch" not in type(photo_by_photo._input_dataset).__name__  # noqa: SLF001
    assert "Unbatch" in type(photo_by_photo._input_dataset).__name__  # noqa: SLF001
    decoded = load_version(root, "train", decode=True)
    assert "Prefetch" in type(decoded).__name__


def exif_rotated_jpeg(width=20, height=10) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6 (rotate 90 degrees to show upright)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(out, "JPEG", exif=exif.tobytes())
    return out.getvalue()


def test_decode_gives_upright_rgb_arrays_through_the_one_photo_decoder(tmp_path):
    """decode=True yields uint8 HxWx3 images as shoplens.photos decodes them: a phone photo
    stored sideways with an EXIF orientation comes out upright (10x20 stored -> 20 high)."""
    sideways = exif_rotated_jpeg()
    root = write_local_dataset(tmp_path / "v1", "v1", LABELS[:1],
                               [(sideways, 0, "train"), (jpeg_bytes(1, 16), 0, "val"),
                                (jpeg_bytes(2, 16), 0, "test")])
    (element,) = load_version(root, "train", decode=True).as_numpy_iterator()
    assert element["image"].dtype == np.uint8 and element["image"].shape == (20, 10, 3)
    assert tuple(int(c) for c in element["image"][0, 0]) == pytest.approx((200, 30, 30), abs=8)


def test_load_version_refuses_what_is_not_a_streamable_split(tmp_path):
    """An unknown split, a split without shards, an incomplete folder and a bare version id
    without settings each give a DatasetError saying what is wrong."""
    root = version(tmp_path)
    with pytest.raises(DatasetError, match="unknown split 'training'"):
        load_version(root, "training")
    no_test = version(tmp_path, "v0004", per_split=(3, 3, 0))
    with pytest.raises(DatasetError, match="has no test shards"):
        load_version(no_test, "test")
    (root / layout.VERSION_FILE).unlink()
    with pytest.raises(DatasetError, match="version.json .written last. is missing"):
        load_version(root, "train")
    with pytest.raises(DatasetError, match="pass settings"):
        load_version("v0009", "train")


def test_a_version_id_with_settings_is_downloaded_verified_and_streamed(s3_settings, tmp_path):
    """With settings, a version id is materialised from the store into the cache folder (all
    digests checked) and streamed from there; a second call reuses the download."""
    source = version(tmp_path / "source")
    layout.upload_version(ObjectStore(s3_settings), "v0003", source)
    cache = tmp_path / "cache"

    first = streamed(load_version("v0003", "val", settings=s3_settings, cache_dir=cache))

    assert layout.is_complete(cache / "v0003", digests=True)
    assert first == streamed(load_version(source, "val"))
    marker = (cache / "v0003" / layout.VERSION_FILE).stat().st_mtime_ns
    load_version("v0003", "val", settings=s3_settings, cache_dir=cache)
    assert (cache / "v0003" / layout.VERSION_FILE).stat().st_mtime_ns == marker


def test_parquet_export_is_read_by_hugging_face_datasets_with_the_image_bytes(tmp_path, monkeypatch):
    """One Parquet file per TFRecord shard; ``load_dataset("parquet")`` reads the image column
    as its Image feature (PIL images of the exported bytes) next to label, product_id, sha256
    and split; exporting again gives the same bytes."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    root = version(tmp_path)
    files = export_parquet(root, tmp_path / "pq")
    assert [f.name for f in files if f.name.startswith("train")] == [
        f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    again = export_parquet(root, tmp_path / "pq2")
    assert [f.read_bytes() for f in files] == [f.read_bytes() for f in again]

    from datasets import Image as HFImage
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files={s: str(tmp_path / "pq" / f"{s}-*.parquet")
                                             for s in layout.SPLITS},
                      cache_dir=str(tmp_path / "hf-cache"))
    train = ds["train"]
    assert isinstance(train.features["image"], HFImage)
    raw = train.cast_column("image", HFImage(decode=False))
    whole = LocalDataset(root).load_split("train")
    assert [r["image"]["bytes"] for r in raw] == whole.encoded
    assert raw["label"] == whole.labels.tolist() and raw["sha256"] == whole.sha256
    assert raw["product_id"] == [900 + lab for lab in whole.labels.tolist()]
    assert set(raw["split"]) == {"train"} and ds["test"].num_rows == 2
    assert train[0]["image"].size == Image.open(io.BytesIO(whole.encoded[0])).size


def test_webdataset_export_holds_each_photo_its_label_and_metadata(tmp_path):
    """One tar per TFRecord shard; per photo ``<sha256>.<ext>`` (the exact bytes),
    ``<sha256>.cls`` (the label) and ``<sha256>.json``, in that order."""
    root = version(tmp_path)
    files = export_webdataset(root, tmp_path / "wds", splits=("val",))
    assert [f.name for f in files] == ["val-00000-of-00001.tar"]
    whole = LocalDataset(root).load_split("val")
    with tarfile.open(files[0]) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar}
        names = tar.getnames()
    assert len(names) == 3 * len(whole)
    for data, label, sha in zip(whole.encoded, whole.labels.tolist(), whole.sha256):
        meta = json.loads(members[f"{sha}.json"])
        assert meta == {"image": f"{sha}.bin", "label": label, "product_id": 900 + label,
                        "sha256": sha, "split": "val"}  # this folder's manifest has no format
        assert members[meta["image"]] == data and members[f"{sha}.cls"] == f"{label}\n".encode()
        assert names.index(f"{sha}.bin") + 2 == names.index(f"{sha}.json")


def test_an_interrupted_export_leaves_no_file_a_reader_would_take(tmp_path, monkeypatch):
    """A failure in the middle of a shard leaves no file under its name (only the files
    finished before it), so a glob over the export never picks up half a shard."""
    root = version(tmp_path)
    real = datasets._write_parquet_shard

    def fail_on_second(path, records):
        if "train-00001" in str(path.name):
            next(records)
            raise OSError("disk full")
        real(path, records)

    monkeypatch.setattr(datasets, "_write_parquet_shard", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        export_parquet(root, tmp_path / "pq")
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["train-00000-of-00003.parquet"]
    assert pq.read_table(tmp_path / "pq" / "train-00000-of-00003.parquet").num_rows == 2


def doc_examples() -> list[str]:
    section = DOC.read_text().split("## Reading a version from any framework", 1)[1]
    section = section.split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def test_the_manifest_doc_examples_run_as_written(tmp_path):
    """The tf.data, Hugging Face and PyTorch examples of docs/manifest.md, unchanged but for
    their /data/ folder, each run in a fresh interpreter over a generated version and count
    every train photo."""
    examples = doc_examples()
    assert len(examples) == 3
    version(tmp_path)  # the docs' /data/v0003
    train = sum(1 for *_, s in photos() if s == "train")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HOME": str(tmp_path / "hf"),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    outputs = []
    for code in examples:
        assert "/data/v0003" in code
        done = subprocess.run([sys.executable, "-c", code.replace("/data/", f"{tmp_path}/")],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs.append(done.stdout)
    assert f"tf.data train photos: {train}\n" in outputs[0]
    assert f"HF train photos: {train} " in outputs[1]
    assert f"PyTorch train photos: {train}\n" in outputs[2]


def test_materialise_on_the_command_line_also_exports_parquet_and_tar_shards(
        fresh_database, s3_settings, monkeypatch, tmp_path, capsys):
    """``python -m dataset build --materialise V --out D --parquet P --webdataset W`` downloads
    a built version and writes both exports, with each photo's format as its file extension;
    the flags without --materialise are a usage error."""
    from dataset.build import cli as build_cli
    from dataset.build import stage as build

    migrate_for_build(fresh_database)
    settings = s3_settings.with_overrides(manifest_url=fresh_database,
                                          dataset_min_photos_per_product=3)
    for field in ("manifest_url", "s3_endpoint", "s3_access_key", "s3_secret_key", "s3_bucket"):
        monkeypatch.setenv(f"SHOPLENS_{field.upper()}", str(getattr(settings, field)))
    monkeypatch.setenv("SHOPLENS_DATASET_MIN_PHOTOS_PER_PRODUCT", "3")
    writer = ManifestWriter(fresh_database, settings)
    for product_id in (11, 12):
        writer.product(product_id)
        writer.photos(product_id, 8)
    build.run(settings, "run-1")

    assert build_cli.main(["--materialise", "v0001", "--out", str(tmp_path / "v"),
                           "--parquet", str(tmp_path / "pq"),
                           "--webdataset", str(tmp_path / "wds")]) == 0
    capsys.readouterr()
    rows = pq.read_table(sorted((tmp_path / "pq").glob("*.parquet"))).to_pylist()
    assert len(rows) == 16
    assert all(r["image"]["path"] == f"{r['sha256']}.jpg" for r in rows)
    assert all(hashlib.sha256(r["image"]["bytes"]).hexdigest() == r["sha256"] for r in rows)
    assert {r["product_id"] for r in rows} == {11, 12}
    tar_names = [n for t in sorted((tmp_path / "wds").glob("*.tar")) for n in tarfile.open(t).getnames()]
    assert sorted(n for n in tar_names if n.endswith(".jpg")) == sorted(r["image"]["path"] for r in rows)
    with pytest.raises(SystemExit):
        build_cli.main(["--parquet", str(tmp_path / "x")])


def test_evaluating_a_model_streams_the_test_split_in_batches(tmp_path, monkeypatch):
    """evaluate_model_on feeds the model the test split a batch of at most 64 photos at a time,
    with their sha256 as names, and scores every photo against its label."""
    from modeling import ensemble, train

    root = version(tmp_path, per_split=(3, 3, 70), shard_size=30)
    dataset = LocalDataset(root)
    label_of = dict(zip(dataset.load_split("test").sha256, dataset.load_split("test").labels))
    wrong = sorted(label_of)[0]
    batches = []

    class Stub:
        tta = False
        labels = LABELS

        def member_probs(self, photos, names):
            batches.append(len(photos))
            assert [hashlib.sha256(p).hexdigest() for p in photos] == names
            probs = np.full((len(names), 3), 0.1, dtype=np.float32)
            for i, name in enumerate(names):
                probs[i, (label_of[name] + (name == wrong)) % 3] = 0.8
            return {"m": probs}

    monkeypatch.setattr(ensemble, "is_ensemble_dir", lambda ref: True)
    monkeypatch.setattr(ensemble.Ensemble, "load", classmethod(lambda cls, root: Stub()))
    scores, tta = train.evaluate_model_on(train.Settings(), str(tmp_path), dataset, tmp_path)

    assert batches == [64, 6] and tta is False
    assert scores["m"]["n"] == 70 and scores["m"]["top1"] == pytest.approx(69 / 70)

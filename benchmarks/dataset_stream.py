"""Does ``load_version`` stream a split in bounded memory, as fast as reading the shards raw?

Generates a version folder through the export contract (``modeling.dataset_layout.
write_local_dataset``) whose train split holds N photos (seeded-noise JPEGs, ``--side`` pixels,
about 15 KB each at 128 px) in shards of the build's default 512 photos, then measures in one run:

- memory: each reader iterates the whole train split in a fresh child process. After a warm-up
  (TensorFlow imported, the pipeline built and one photo read, so the runtime's thread pools and
  first buffers exist), the child resets the kernel's peak-RSS counter (``5`` into
  ``/proc/self/clear_refs``) and notes its RSS; after the pass, peak RSS (``VmHWM``) minus that
  baseline is the growth the pass caused. RSS covers TensorFlow's CPU allocations (malloc)
  as well as Python's. Readers: ``load_version`` (encoded bytes), ``load_version(decode=True)``,
  the raw ``TFRecordDataset`` loop, and as a control the in-memory ``LocalDataset.load_split``
  (which must show the whole split, or the method is blind). Target: load_version's growth
  <= 2x the largest shard's size.
- speed: full passes of the raw ``tf.data.TFRecordDataset`` over the same shard files (records
  unparsed, summing record lengths) and of ``load_version`` (parsed, summing photo lengths), alternated
  round by round in this process, in three ways (:data:`SPEED_MODES`); ratio = raw seconds /
  load_version seconds per round, median over rounds. Target: >= 0.9. A fourth comparison puts
  the in-graph pass against reading and parsing the files directly (``parse_single_example``),
  which a reader needs for photos and labels; it is reported, not the target.

Writes results/dataset_stream.json.

    nice -n 10 .venv/bin/python benchmarks/dataset_stream.py [--photos 5000] [--side 128] [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SHARD_PHOTOS = 512  # the build's default dataset_images_per_shard
# in_graph: the whole pass inside tf.data (Dataset.reduce), as Keras' fit consumes a dataset;
# python_loop_per_photo: a Python for-loop over single photos; batches_of_64: a Python loop over
# batches (raw: TFRecordDataset.batch(64); load_version(batch_size=64));
# read_and_parse_in_graph: in_graph against what a user reading the files directly must also
# do to get photos and labels, TFRecordDataset + tf.io.parse_single_example with the layout's
# feature spec (the TensorFlow guide's way) - context, not the target's baseline.
SPEED_MODES = ("in_graph", "python_loop_per_photo", "batches_of_64", "read_and_parse_in_graph")
READERS = ("load_version", "load_version_decode", "raw_tfrecord", "load_split_in_memory")


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(root: str, reader: str) -> None:
    """One reader's pass over the train split; prints its RSS growth as JSON."""
    import tensorflow as tf

    from modeling.dataset_layout import LocalDataset
    from shoplens.datasets import load_version

    local = LocalDataset(root)
    files = [str(p) for p in local.shard_files("train")]
    if reader == "raw_tfrecord":
        elements = iter(tf.data.TFRecordDataset(files))
    else:
        elements = (e["image"] for e in load_version(local, "train",
                                                     decode=reader == "load_version_decode"))
    seen, total = 1, len(next(elements).numpy())  # warm-up: runtime up, first buffers filled
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    baseline = proc_status_kib("VmRSS")
    if reader == "load_split_in_memory":
        split = local.load_split("train")
        seen, total = len(split), sum(len(b) for b in split.encoded)
    else:
        for image in elements:
            seen += 1
            total += image.numpy().nbytes if reader == "load_version_decode" else len(image.numpy())
    peak = proc_status_kib("VmHWM")
    print(json.dumps({"reader": reader, "photos": seen, "bytes_touched": total,
                      "baseline_rss_mib": round(baseline / 1024, 1),
                      "peak_rss_mib": round(peak / 1024, 1),
                      "growth_mib": round((peak - baseline) / 1024, 2)}))


def generate(root: Path, photos: int, side: int) -> Path:
    from build_fixtures import jpeg_bytes
    from modeling.dataset_layout import write_local_dataset

    labels = [{"label": i, "product_id": 1000 + i, "name": f"product {i}", "category_id": "1"}
              for i in range(20)]
    rows = [(jpeg_bytes(seed, side), seed % 20, "train") for seed in range(photos)]
    rows += [(jpeg_bytes(photos + seed, side), seed % 20, split)
             for split in ("val", "test") for seed in range(20)]
    return write_local_dataset(root / "v5000", "v5000", labels, rows, SHARD_PHOTOS)


def speed(root: Path, rounds: int) -> dict:
    import tensorflow as tf

    from modeling.dataset_layout import LocalDataset
    from shoplens.datasets import load_version
    from shoplens.export_layout import ENCODED_KEY, feature_spec

    local = LocalDataset(root)
    files = [str(p) for p in local.shard_files("train")]
    spec = feature_spec()

    def length(image) -> tf.Tensor:
        return tf.cast(tf.reduce_sum(tf.strings.length(image)), tf.int64)

    def raw(mode: str) -> int:
        ds = tf.data.TFRecordDataset(files)
        if mode == "read_and_parse_in_graph":
            return int(ds.map(lambda r: tf.io.parse_single_example(r, spec)).reduce(
                tf.constant(0, tf.int64), lambda acc, e: acc + length(e[ENCODED_KEY])))
        if mode == "in_graph":
            return int(ds.reduce(tf.constant(0, tf.int64), lambda acc, r: acc + length(r)))
        if mode == "batches_of_64":
            return sum(int(length(r)) for r in ds.batch(64))
        return sum(len(r.numpy()) for r in ds)

    def streamed(mode: str) -> int:
        if mode in ("in_graph", "read_and_parse_in_graph"):
            return int(load_version(local, "train").reduce(
                tf.constant(0, tf.int64), lambda acc, e: acc + length(e["image"])))
        if mode == "batches_of_64":
            return sum(int(length(e["image"])) for e in load_version(local, "train", batch_size=64))
        return sum(len(e["image"].numpy()) for e in load_version(local, "train"))

    out = {}
    for mode in SPEED_MODES:
        raw(mode), streamed(mode)  # warm-up: page cache, pipelines
        raw_s, stream_s, ratios = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            raw(mode)
            t1 = time.perf_counter()
            streamed(mode)
            t2 = time.perf_counter()
            raw_s.append(t1 - t0)
            stream_s.append(t2 - t1)
            ratios.append((t1 - t0) / (t2 - t1))
        median = statistics.median(ratios)
        out[mode] = {"raw_seconds": [round(s, 3) for s in raw_s],
                     "load_version_seconds": [round(s, 3) for s in stream_s],
                     "ratios": [round(r, 3) for r in ratios], "ratio_median": round(median, 3),
                     "meets_target": median >= 0.9}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=5000)
    parser.add_argument("--side", type=int, default=128, help="JPEG side in pixels")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "results" / "dataset_stream.json"))
    parser.add_argument("--child", nargs=2, metavar=("ROOT", "READER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0

    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="shoplens-stream-") as tmp:
        root = generate(Path(tmp), args.photos, args.side)
        shards = sorted((root / "tfrecords").glob("train-*.tfrecord"))
        shard_max = max(p.stat().st_size for p in shards)
        split_bytes = sum(p.stat().st_size for p in shards)
        memory = {}
        for reader in READERS:
            done = subprocess.run([sys.executable, __file__, "--child", str(root), reader],
                                  capture_output=True, text=True, check=True)
            memory[reader] = json.loads(done.stdout.strip().splitlines()[-1])
        timing = speed(root, args.rounds)
    growth = memory["load_version"]["growth_mib"] * 2**20
    result = {
        "photos_in_split": args.photos, "jpeg_side_px": args.side,
        "photos_per_shard": SHARD_PHOTOS, "train_shards": len(shards),
        "largest_shard_mib": round(shard_max / 2**20, 2),
        "split_mib": round(split_bytes / 2**20, 2),
        "memory": memory,
        "memory_growth_over_largest_shard": round(growth / shard_max, 3),
        "memory_target": "<= 2.0",
        "speed": timing, "speed_target": ">= 0.9 (raw seconds / load_version seconds, median)",
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.perf_counter() - started, 1),
        "command": "nice -n 10 .venv/bin/python benchmarks/dataset_stream.py " + " ".join(sys.argv[1:]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

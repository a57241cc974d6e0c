"""Does a search index built one embedding batch at a time cost what it costs built at once?

A refresh adds the night's vectors to ``modeling.search_index.SearchIndex`` one embedding batch
at a time (``search_embed_batch``, 64) and then saves. Until 2026-12-04 each addition copied the
whole vector matrix (quadratic in the photos: 5.9 s of copying for 50,000 vectors, about 40 min
projected at a million) and became a chunk file of its own (782 files for 50,000 vectors, each
uploaded as an object). Now additions are joined once, on the next read, and what was added
since the last save is written as chunks of up to ``CHUNK_VECTORS``.

For each size N it times, in one process and alternating, two ways of building the same index
of N random 1280-d vectors (Lite0's width) over 1,000 products and saving it to a temporary
folder: ``at_once`` (one ``add_vectors`` call, the baseline) and ``in_batches`` (N / 64 calls,
as a refresh does). Reported per size: seconds of each (add, save), their ratio (in_batches /
at_once, medians of the rounds) and the chunk files each wrote. Writes ``--out``.

    nice -n 10 .venv/bin/python benchmarks/index_batches.py            # ~1 min
    .venv/bin/python benchmarks/index_batches.py --sizes 10000 --rounds 1   # quick
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DIM, PRODUCTS, BATCH = 1280, 1000, 64


class _StoredNothing:
    """An embedder stand-in: the index saves its config and nothing else (no network)."""

    def save(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)

    def config(self) -> dict:
        return {"backbone": "none"}


def build(vectors: np.ndarray, batch: int | None) -> dict:
    from modeling.search_index import CHUNK_DIR, SearchIndex

    index = SearchIndex(_StoredNothing(), dim=DIM, embedding_config={"backbone": "none"})
    index.add_products([{"product_id": p, "name": f"product {p}"} for p in range(PRODUCTS)])
    pids = np.arange(len(vectors)) % PRODUCTS
    sources = [f"review/{i}" for i in range(len(vectors))]
    step = batch or len(vectors)
    t0 = time.perf_counter()
    for i in range(0, len(vectors), step):
        index.add_vectors(vectors[i:i + step], pids[i:i + step], sources[i:i + step])
    len(index._vectors)  # noqa: SLF001 - what a search or calibration reads first
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="index-batches-") as folder:
        index.save(folder)
        files = len(os.listdir(Path(folder) / CHUNK_DIR))
    t2 = time.perf_counter()
    return {"add_s": t1 - t0, "save_s": t2 - t1, "total_s": t2 - t0, "chunk_files": files}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,50000", help="comma-separated vector counts")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "index_batches.json")
    args = ap.parse_args(argv)
    started, load_start = time.monotonic(), os.getloadavg()
    rng = np.random.default_rng(0)
    results = {}
    for n in (int(s) for s in args.sizes.split(",")):
        vectors = rng.normal(size=(n, DIM)).astype(np.float32)
        runs: dict[str, list[dict]] = {"at_once": [], "in_batches": []}
        for r in range(args.rounds):
            order = ("at_once", "in_batches") if r % 2 == 0 else ("in_batches", "at_once")
            for way in order:
                runs[way].append(build(vectors, BATCH if way == "in_batches" else None))
        med = {way: {k: round(statistics.median(x[k] for x in rs), 3)
                     for k in ("add_s", "save_s", "total_s")} | {"chunk_files": rs[0]["chunk_files"]}
               for way, rs in runs.items()}
        med["in_batches_vs_at_once"] = round(med["in_batches"]["total_s"]
                                             / med["at_once"]["total_s"], 3)
        results[str(n)] = med
        print(n, json.dumps(med), flush=True)
    out = {"benchmark": "index_batches", "dim": DIM, "products": PRODUCTS, "batch": BATCH,
           "rounds": args.rounds, "sizes": results,
           "command": "benchmarks/index_batches.py " + " ".join(
               argv if argv is not None else sys.argv[1:]),
           "wall_s": round(time.monotonic() - started, 1), "load_average_at_start": load_start,
           "load_average_at_end": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

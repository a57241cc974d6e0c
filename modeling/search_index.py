"""The product search index: one embedding per enrolled photo, tagged with its product, searched
with faiss; answers are products ranked by similarity, with a calibrated "confident" rule.

Why faiss (``benchmarks/search_index.py`` -> results/search_index.json, 1 M synthetic 256-d
vectors, 2 busy cores): IVF1024 with 8-bit scalar-quantised lists builds in 28 s, adds 1 % new
vectors in 0.16 s (0.6 % of the build), answers one query in 1.7 ms p95 on one thread at
nprobe 32 with 97 % of the exact top-10 found, and keeps 265 bytes per vector. usearch's HNSW
(i8) searches faster (0.35 ms) but its build extrapolates to >= 200 s at 1 M (HNSW inserts slow
down as the graph grows) at 568 bytes per vector and 93 % top-10 recall; faiss's own HNSW is
slower to build still. Small indexes (under ``EXACT_BELOW`` vectors) are searched exactly
(``IndexFlatIP``): as fast, and no recall lost. Candidates are re-scored exactly from the stored
vectors, so quantisation never changes a reported score.

Scores are cosine similarities (embeddings are unit length, the index uses inner product).
A product's score is its prototype's — the normalised mean of its photos' embeddings
("prototype", the default) — or its best photo's ("max"). On the grocery open-set benchmark
prototypes rank better at R@1 for both novel and seen products, with every embedding tried
(e.g. EfficientNet-Lite0, fine-tuned: novel 0.66 vs 0.59, seen 0.80 vs 0.72); "max" kept a
higher novel R@3 with the trained embedding (0.88 vs 0.82). The photo vectors stay stored either
way, so the choice is a setting, not a rebuild.

"No confident match" (``threshold`` in index.json, chosen by ``calibrate`` or
``calibrate_leave_one_out``): a confidence rule scores each answer from its two best product
scores s1 >= s2, and answers scoring under the rule's calibrated cut are not confident:
``top1`` (s1), ``margin`` (s1 - s2: how far the winner is from the runner-up) or ``combined``
(the log-odds of a logistic regression on [s1, s1 - s2] fitted on the calibration queries). Why
the margin: on grocery the top-1 score hardly tells a right answer from a wrong one for products
the embedding never trained on (two look-alike products both score high), while a clear lead over
the runner-up does (docs/benchmarks.md, "Confidence threshold"). The top-1 cut is calibrated and
stored whatever the rule (``threshold["threshold"]``: the manifest's ``search_indexes.threshold``
and the salvage read it); an index saved before the rules existed has only that cut and keeps
using it.

Directory layout (``save`` / ``load``)::

    index.json          config: embedding, dim, aggregation, threshold, counts, chunk files, ann file
    products.json       [{product_id, name, ...}] every enrolled product
    chunks/NNNNNN.npz   vectors (float16), product_ids, sources: one file per batch of added photos
    ann-<n>.faiss       the trained (IVF) faiss structure over the first n vectors; an exact one
                        (below EXACT_BELOW vectors) is not stored, it is rebuilt from the chunks
    embedding/          the embedder that made the vectors (see modeling.embedding)

Extending it (``add_photos`` + ``save`` to the same directory) embeds only the new photos and
writes only a new chunk; index.json is replaced last, atomically, so a crash mid-save leaves the
previous index readable.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shoplens.vision.embedding import Embedder, l2_normalise
from shoplens.config import Settings

INDEX_FILE = "index.json"
PRODUCTS_FILE = "products.json"
CHUNK_DIR = "chunks"
CHUNK_VECTORS = 65_536  # the most vectors one saved chunk holds (168 MB of 1280-d float16)
# A night adds a chunk: past this many chunks, a save rewrites the small ones (under a quarter
# of CHUNK_VECTORS) as few, so loading and downloading a version stays a few files.
COMPACT_ABOVE_CHUNKS = 16
EMBEDDING_DIR = "embedding"
FORMAT = 1
# Below this many vectors exact search is as fast as an ANN structure and loses nothing.
EXACT_BELOW = 50_000
AGGREGATIONS = ("max", "prototype")
# "No confident match" rules; an index json without a rule was calibrated on the top-1 score.
CONFIDENCE_RULES = ("top1", "margin", "combined")
DEFAULT_CONFIDENCE_RULE = "combined"
# Leave-one-out calibration: the fraction of a query photo's own product's photos (the ones most
# like it) also left out (``calibrate_leave_one_out``).
DEFAULT_CALIBRATION_HOLDOUT = 0.5
LEGACY_CONFIDENCE_RULE = "top1"
# The runner-up score when there is none (a one-product index): the lowest cosine.
NO_RUNNER_UP = -1.0


class SearchIndexError(ValueError):
    """A directory is not a loadable search index, or an addition is inconsistent."""


@dataclass(frozen=True)
class Hit:
    product_id: int
    name: str
    score: float

    def as_dict(self) -> dict:
        return {"product_id": self.product_id, "name": self.name, "score": round(self.score, 4)}


def ann_factory(n: int) -> str:
    """The faiss index for n vectors: exact when small, inverted lists (IVF, 8-bit scalar
    quantised vectors) when large; about sqrt(n) lists (the low end of faiss's guidelines: the
    k-means training and assignment cost grows with the list count, and builds run on 2 cores)."""
    if n < EXACT_BELOW:
        return "Flat"
    nlist = int(2 ** round(np.log2(np.sqrt(n))))
    return f"IVF{nlist},SQ8"


def build_ann(vectors: np.ndarray, factory: str, nprobe: int = 32, train_sample: int = 100_000,
              seed: int = 0):
    """A faiss inner-product index of ``factory`` over ``vectors`` (ids = row numbers)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    ann = faiss.index_factory(x.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    if not ann.is_trained:
        rng = np.random.default_rng(seed)
        sample = x if len(x) <= train_sample else x[np.sort(rng.choice(len(x), train_sample,
                                                                       replace=False))]
        ann.train(sample)
    ann.add(x)
    set_nprobe(ann, nprobe)
    return ann


def set_nprobe(ann, nprobe: int) -> None:
    import faiss

    try:
        faiss.extract_index_ivf(ann).nprobe = nprobe
    except RuntimeError:  # not an IVF index: nothing to probe
        pass


def product_sums(positions: np.ndarray, vectors: np.ndarray, count: int) -> np.ndarray:
    """float64 (count, dim): the sum of the ``vectors`` rows of each position 0..count-1.

    One ``sum(dtype=float64)`` per position over its rows, gathered from the float16 vectors
    as they are: 4.5x faster than ``np.add.reduceat`` over a float64 copy of every row (111
    of a 10,000-photo refresh's 213 ms of calibration), and no copy of the whole matrix.
    Exact: float16 unit vectors lie on a 2^-24 grid, so every partial sum of up to 2^29 of
    them is a float64 without rounding, and the result does not depend on the row order."""
    order = np.argsort(positions, kind="stable")
    pos = positions[order]
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]]) if len(pos) else pos
    ends = np.r_[starts[1:], len(pos)]
    sums = np.zeros((count, vectors.shape[1]), np.float64)
    for start, end in zip(starts, ends):
        sums[pos[start]] = vectors[order[start:end]].sum(axis=0, dtype=np.float64)
    return sums


def calibration_sample(rows: list[int], sources: list[str], size: int, seed: int) -> list[int]:
    """``size`` of ``rows``, in order, chosen by a seeded hash of each row's source name: the same
    photos whatever order the vectors were added in (an incremental refresh and a full rebuild
    of one catalogue calibrate on the same queries, so they choose the same threshold), and
    each refresh's leave-one-out search is capped at ``size`` queries."""
    import hashlib

    def rank(row):
        return hashlib.blake2b(f"{seed}:{sources[row]}".encode(), digest_size=8).digest()
    return sorted(sorted(rows, key=rank)[:size])


def holdout_count(photos: int, holdout: float) -> int:
    """How many of a product's ``photos`` a leave-one-out query leaves out: itself and, with a
    holdout, that fraction of them (at least itself, never all)."""
    return min(photos - 1, max(1, int(holdout * photos)))


def calibrate_threshold(scores, correct, target_precision: float = 0.95) -> dict:
    """The lowest score that keeps precision >= target on the queries it answers.

    ``scores``: each validation query's best score; ``correct``: whether that best answer was
    right. Queries scoring at or above the threshold are answered, the others get "no confident
    match". When no threshold reaches the target, it is set above every score (answer nothing).
    """
    scores = np.asarray(scores, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    if len(scores) == 0:
        raise ValueError("calibration needs at least one validation query")
    order = np.argsort(-scores, kind="stable")
    s, c = scores[order], correct[order]
    precision = np.cumsum(c) / np.arange(1, len(s) + 1)
    # Only the last position of a run of equal scores is a real cut: a threshold answers all ties.
    cut = np.r_[s[1:] != s[:-1], True]
    ok = np.flatnonzero(cut & (precision >= target_precision))
    if len(ok) == 0:
        threshold, answered, prec = float(s[0]) + 1e-6, 0, None
    else:
        i = int(ok[-1])
        threshold, answered, prec = float(s[i]), i + 1, float(precision[i])
    return {"threshold": threshold, "target_precision": target_precision, "precision": prec,
            "coverage": answered / len(s), "answered": answered, "queries": int(len(s))}


def threshold_outcome(scores, correct, threshold: float) -> dict:
    """Precision and coverage of a given threshold on (other) queries."""
    scores, correct = np.asarray(scores, dtype=np.float64), np.asarray(correct, dtype=bool)
    answered = scores >= threshold
    n = int(answered.sum())
    return {"threshold": float(threshold), "precision": float(correct[answered].mean()) if n else None,
            "coverage": n / len(scores) if len(scores) else 0.0, "answered": n,
            "queries": int(len(scores))}


def confidence_inputs(ranked_scores) -> tuple[float, float]:
    """(s1, s2): an answer's best and second-best product scores (s2 ``NO_RUNNER_UP`` when
    there is a single product)."""
    scores = [float(x) for x in ranked_scores]
    if not scores:
        raise ValueError("an answer without any product has no confidence")
    return scores[0], scores[1] if len(scores) > 1 else NO_RUNNER_UP


def confidence_values(rule: str, s1, s2, weights=None) -> np.ndarray:
    """The confidence of answers with best scores ``s1`` and runner-up scores ``s2`` under
    ``rule`` (higher: more likely right). ``weights`` [bias, s1, margin] for "combined"."""
    s1, s2 = np.asarray(s1, dtype=np.float64), np.asarray(s2, dtype=np.float64)
    if rule == "top1":
        return s1
    if rule == "margin":
        return s1 - s2
    if rule == "combined":
        if weights is None or len(weights) != 3:
            raise ValueError("the combined rule needs 3 weights [bias, s1, margin]")
        w = np.asarray(weights, dtype=np.float64)
        return w[0] + w[1] * s1 + w[2] * (s1 - s2)
    raise ValueError(f"confidence rule must be one of {CONFIDENCE_RULES}, got {rule!r}")


def fit_logistic(features, correct, l2: float = 1e-2, iterations: int = 50) -> list[float]:
    """[bias, w...] of an L2-regularised logistic regression of ``correct`` on ``features``
    (Newton's method; the ridge keeps the weights finite when the classes separate)."""
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(correct, dtype=np.float64)
    x = np.column_stack([np.ones(len(x)), x])
    w = np.zeros(x.shape[1])
    ridge = l2 * np.eye(x.shape[1])
    ridge[0, 0] = 0.0  # the bias is not shrunk
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + ridge @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + ridge + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return [float(v) for v in w]


def calibrate_confidence(s1, s2, correct, target_precision: float = 0.95,
                         rule: str = DEFAULT_CONFIDENCE_RULE) -> dict:
    """The "no confident match" rule calibrated on labelled queries: each query's best and
    runner-up product scores and whether the best was right. Returns the index's ``threshold``
    record: ``rule``, ``cut`` (the lowest confidence keeping ``target_precision`` on the queries
    it answers), ``weights`` (the combined rule's logistic regression, fitted on the same
    queries), the outcome (precision, coverage, answered, queries), the top-1 cut as
    ``threshold`` whatever the rule, and ``rules``: every rule's outcome on these queries."""
    if rule not in CONFIDENCE_RULES:
        raise ValueError(f"confidence rule must be one of {CONFIDENCE_RULES}, got {rule!r}")
    s1, s2 = np.asarray(s1, dtype=np.float64), np.asarray(s2, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    # The queries in one canonical order: the fit's float sums then do not depend on the order
    # the index holds its vectors in (an incremental refresh and a full rebuild differ there).
    order = np.lexsort((correct, s2, s1))
    s1, s2, correct = s1[order], s2[order], correct[order]
    weights = fit_logistic(np.column_stack([s1, s1 - s2]), correct) if len(s1) else None
    outcomes = {}
    for name in CONFIDENCE_RULES:
        w = weights if name == "combined" else None
        chosen = calibrate_threshold(confidence_values(name, s1, s2, w), correct,
                                     target_precision)
        outcomes[name] = {"cut": chosen["threshold"], "weights": w,
                          **{k: chosen[k] for k in ("precision", "coverage", "answered")}}
    picked = outcomes[rule]
    return {"rule": rule, "cut": picked["cut"], "weights": picked["weights"],
            "threshold": outcomes["top1"]["cut"], "target_precision": target_precision,
            "precision": picked["precision"], "coverage": picked["coverage"],
            "answered": picked["answered"], "queries": int(len(s1)),
            "rules": {k: {kk: vv for kk, vv in v.items() if kk != "weights"}
                      for k, v in outcomes.items()}}


def confidence_rule(threshold: dict | None) -> tuple[str, float, list | None] | None:
    """(rule, cut, weights) of an index's ``threshold`` record; an older record (no rule) is
    the top-1 cut. None when the index was never calibrated."""
    if threshold is None or threshold.get("threshold") is None:
        return None
    rule = threshold.get("rule", LEGACY_CONFIDENCE_RULE)
    cut = threshold.get("cut", threshold["threshold"]) if "rule" in threshold \
        else threshold["threshold"]
    return rule, float(cut), threshold.get("weights")


class SearchIndex:
    def __init__(self, embedder: Embedder, aggregation: str = "prototype", nprobe: int = 32,
                 dim: int | None = None, embedding_config: dict | None = None):
        """``dim`` / ``embedding_config``: the embedder's, when known without building its
        backbone (a loaded index knows them from index.json: searching stored vectors, adding
        vectors and saving then never build the network)."""
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.embedder = embedder
        self.aggregation = aggregation
        self.nprobe = nprobe
        self.threshold: dict | None = None
        self._dim = int(dim) if dim else embedder.dim
        self._embedding_config = embedding_config
        self.products: dict[int, dict] = {}
        self._chunks: list[dict] = []       # {"vectors" f16, "product_ids", "sources", "file"}
        # Every vector in one matrix (what search and calibration read), and the chunks added
        # since it was last read: joined once on the next read, not copied on every addition.
        self._matrix = np.zeros((0, self._dim), np.float16)
        self._matrix_pids = np.zeros(0, np.int64)
        self._unjoined: list[dict] = []
        self._count = 0
        self._sources: set[str] = set()
        self._ann = None                    # the per-photo ANN, made on first use (max aggregation)
        self._ann_factory = None
        self._stored_ann: tuple[Path, str, int] | None = None  # (file, factory, vectors) on disk
        self._prototypes = None
        self._prototype_sums = None
        self.root: Path | None = None
        self.built_at: str | None = None

    # --- contents -----------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self._dim

    def __len__(self) -> int:
        return self._count

    @property
    def _vectors(self) -> np.ndarray:
        """float16 (N, dim): every vector, in the order added."""
        self._join()
        return self._matrix

    @property
    def _product_ids(self) -> np.ndarray:
        """int64 (N,): each vector's product."""
        self._join()
        return self._matrix_pids

    def _join(self) -> None:
        if self._unjoined:
            self._matrix = np.concatenate([self._matrix] + [c["vectors"] for c in self._unjoined])
            self._matrix_pids = np.concatenate([self._matrix_pids]
                                               + [c["product_ids"] for c in self._unjoined])
            self._unjoined = []

    def has_source(self, source: str) -> bool:
        return source in self._sources

    def sources(self) -> list[str]:
        """Every enrolled source, in vector order."""
        return [str(s) for c in self._chunks for s in c["sources"].tolist()]

    def product_count(self) -> int:
        """Products with at least one vector (the searchable ones)."""
        return len(set(self._product_ids.tolist()))

    def vectors_by_sha(self, sha_of, only=None) -> dict[str, np.ndarray]:
        """{sha_of(source): its stored vector}: photos already embedded, whatever source names
        them; with ``only`` (a collection of shas), just those of them that are stored."""
        shas = ((sha_of(s), i) for i, s in enumerate(self.sources()))
        rows = {sha: i for sha, i in shas if only is None or sha in only}
        return {sha: self._vectors[i].astype(np.float32) for sha, i in rows.items()}

    def without_sources(self, drop: set[str]) -> "SearchIndex":
        """A new index with the same embedder, products, threshold and every vector but those of
        ``drop`` (copied from the stored vectors: nothing is embedded again)."""
        other = SearchIndex(self.embedder, self.aggregation, self.nprobe, self.dim,
                            self._embedding_config)
        other.threshold = self.threshold
        other.add_products(list(self.products.values()))
        sources = self.sources()
        keep = [i for i, s in enumerate(sources) if s not in drop]
        if keep:
            other.add_vectors(self._vectors[keep].astype(np.float32), self._product_ids[keep],
                              [sources[i] for i in keep])
        return other

    def add_products(self, products: list[dict]) -> None:
        """Register (or update the name and details of) products: {"product_id", "name", ...}."""
        for p in products:
            entry = dict(p)
            entry["product_id"] = int(p["product_id"])
            entry.setdefault("name", str(entry["product_id"]))
            self.products[entry["product_id"]] = entry

    def add_vectors(self, vectors: np.ndarray, product_ids, sources: list[str]) -> int:
        """Append embeddings; sources already in the index are skipped. Returns how many were added."""
        vectors = np.asarray(vectors, dtype=np.float32)
        product_ids = np.asarray(product_ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise SearchIndexError(f"vectors must be (n, {self.dim}), got {vectors.shape}")
        if not (len(vectors) == len(product_ids) == len(sources)):
            raise SearchIndexError("vectors, product_ids and sources differ in length")
        unknown = sorted(set(product_ids.tolist()) - set(self.products))
        if unknown:
            raise SearchIndexError(f"products not registered (add_products first): {unknown[:5]}")
        keep = [i for i, s in enumerate(sources) if s not in self._sources]
        if len(set(sources[i] for i in keep)) != len(keep):
            raise SearchIndexError("the same source appears twice in one addition")
        if not keep:
            return 0
        vecs = l2_normalise(vectors[keep])
        chunk = {"vectors": vecs.astype(np.float16), "product_ids": product_ids[keep],
                 "sources": np.array([sources[i] for i in keep]), "file": None}
        self._chunks.append(chunk)
        self._unjoined.append(chunk)
        self._count += len(keep)
        self._sources.update(chunk["sources"].tolist())
        self._extend_ann(vecs)
        self._prototypes = None
        return len(keep)

    def add_photos(self, photos: list[tuple[object, int, str]], batch: int = 64) -> int:
        """Embed and append upright RGB photos (PIL image, product_id, source); only sources not
        yet in the index go through the embedder."""
        new = [(img, pid, src) for img, pid, src in photos if src not in self._sources]
        added = 0
        for start in range(0, len(new), batch):
            part = new[start:start + batch]
            vecs = self.embedder.embed_decoded([img for img, _, _ in part])
            added += self.add_vectors(vecs, [p for _, p, _ in part], [s for _, _, s in part])
        return added

    def _extend_ann(self, new_vectors: np.ndarray) -> None:
        """Keep a per-photo ANN already made up to date; none is made here."""
        if self._ann is None:
            return
        if ann_factory(len(self)) != self._ann_factory:
            self._ann = None  # the index outgrew its structure: made again on next use
        else:
            self._ann.add(np.ascontiguousarray(new_vectors, dtype=np.float32))

    def _photo_ann(self):
        """The faiss index over every photo's vector, made on first use: only the "max"
        aggregation and its calibration search photos (prototype search has its own, over the
        products), so a prototype index never builds, trains, stores or uploads one (above 50 k
        vectors an IVF training of seconds to minutes per refresh). Made from the stored
        vectors (nothing is embedded again), or read from the file saved with the index and
        extended by the vectors added since."""
        if self._ann is None and len(self):
            factory = ann_factory(len(self))
            stored = self._stored_ann
            if stored is not None and stored[1] == factory and stored[2] <= len(self):
                import faiss

                self._ann = faiss.read_index(str(stored[0]))
                set_nprobe(self._ann, self.nprobe)
                if stored[2] < len(self):
                    self._ann.add(np.ascontiguousarray(self._vectors[stored[2]:], np.float32))
            else:
                self._ann = build_ann(self._vectors, factory, self.nprobe)
            self._ann_factory = factory
        return self._ann

    # --- search -------------------------------------------------------------------------------
    def _product_prototypes(self):
        """(product ids, unit mean vectors, faiss index over them), rebuilt after additions
        (from the stored vectors: nothing is embedded again)."""
        if self._prototypes is None:
            ids = np.array(sorted(set(self._product_ids.tolist())), dtype=np.int64)
            sums = product_sums(np.searchsorted(ids, self._product_ids), self._vectors, len(ids))
            protos = l2_normalise(sums)
            self._prototypes = (ids, protos, build_ann(protos, ann_factory(len(ids)), self.nprobe))
            self._prototype_sums = sums  # float64, kept for the leave-one-out calibration
        return self._prototypes

    def search_vectors(self, queries: np.ndarray, k: int = 3) -> list[list[Hit]]:
        """Top-k products for each query embedding, best first."""
        queries = l2_normalise(np.atleast_2d(queries))
        if len(self) == 0:
            return [[] for _ in queries]
        if self.aggregation == "prototype":
            ids, protos, ann = self._product_prototypes()
            _, rows = ann.search(queries.astype(np.float32), min(k, len(ids)))
            out = []
            for q, found in zip(queries, rows):
                found = found[found >= 0]
                scores = protos[found] @ q  # exact, whatever the ANN's storage
                order = np.argsort(-scores, kind="stable")
                out.append([self._hit(int(ids[found[j]]), float(scores[j])) for j in order])
            return out
        return [self._max_per_product(q, k) for q in queries]

    def _max_per_product(self, query: np.ndarray, k: int) -> list[Hit]:
        # Ask the ANN for more photos until k distinct products are among them.
        want = min(len(self), max(64, 16 * k))
        while True:
            _, rows = self._photo_ann().search(query[None].astype(np.float32), want)
            rows = rows[0][rows[0] >= 0]
            # Re-score the candidates exactly: a quantised index's scores are approximate.
            scores = self._vectors[rows].astype(np.float32) @ query
            best: dict[int, float] = {}
            for r, s in zip(rows, scores):
                pid = int(self._product_ids[r])
                if s > best.get(pid, -np.inf):
                    best[pid] = float(s)
            if len(best) >= k or want >= len(self):
                break
            want = min(len(self), want * 4)
        ranked = sorted(best.items(), key=lambda kv: -kv[1])[:k]
        return [self._hit(pid, s) for pid, s in ranked]

    def _hit(self, product_id: int, score: float) -> Hit:
        return Hit(product_id, str(self.products.get(product_id, {}).get("name", product_id)), score)

    def confidence(self, ranked_scores) -> dict:
        """{"rule", "value", "cut"} of an answer whose product scores (best first, unrounded)
        are ``ranked_scores``; rule, value and cut None when the index was never calibrated."""
        rule = confidence_rule(self.threshold)
        if rule is None or not len(ranked_scores):
            return {"rule": rule and rule[0], "value": None, "cut": rule and rule[1]}
        name, cut, weights = rule
        s1, s2 = confidence_inputs(ranked_scores)
        return {"rule": name, "value": float(confidence_values(name, s1, s2, weights)),
                "cut": cut}

    def is_confident(self, ranked_scores) -> bool:
        """Whether an answer (its product scores, best first, unrounded; at least the best two
        for the margin rules) clears the calibrated rule. A lone float is a best score alone."""
        if np.isscalar(ranked_scores):
            ranked_scores = [ranked_scores]
        c = self.confidence(ranked_scores)
        return c["value"] is not None and c["value"] >= c["cut"]

    def answer(self, query: np.ndarray, k: int = 3) -> dict:
        """{"top": [{product_id, name, score}...], "confident": bool, "confidence": {"rule",
        "value", "cut"}} for one query embedding (the runner-up is looked up even when k = 1)."""
        hits = self.search_vectors(query, max(k, 2))[0]
        scores = [h.score for h in hits]
        conf = self.confidence(scores)
        return {"top": [h.as_dict() for h in hits[:k]],
                "confident": conf["value"] is not None and conf["value"] >= conf["cut"],
                "confidence": {"rule": conf["rule"],
                               "value": None if conf["value"] is None else round(conf["value"], 4),
                               "cut": None if conf["cut"] is None else round(conf["cut"], 4)}}

    def calibrate(self, queries: np.ndarray, true_product_ids, target_precision: float = 0.95,
                  rule: str = DEFAULT_CONFIDENCE_RULE) -> dict:
        """Choose and store the confidence rule's cut on labelled validation queries
        (embeddings)."""
        s1, s2, correct = self.ranked_outcomes(queries, true_product_ids)
        self.threshold = calibrate_confidence(s1, s2, correct, target_precision, rule)
        self.threshold["method"] = "validation queries"
        return self.threshold

    def ranked_outcomes(self, queries: np.ndarray, true_product_ids
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(best score, runner-up score, best is right) per query embedding."""
        hits = self.search_vectors(queries, 2)
        s1, s2 = zip(*[confidence_inputs([x.score for x in h]) if h else (-1.0, NO_RUNNER_UP)
                       for h in hits])
        correct = [bool(h) and h[0].product_id == int(t) for h, t in zip(hits, true_product_ids)]
        return np.array(s1), np.array(s2), np.array(correct, dtype=bool)

    def calibrate_leave_one_out(self, target_precision: float = 0.95, max_queries: int = 2000,
                                seed: int = 0, exclude_prefix: str = "catalogue/",
                                rule: str = DEFAULT_CONFIDENCE_RULE,
                                holdout: float = DEFAULT_CALIBRATION_HOLDOUT) -> dict:
        """Choose and store nothing; return the confidence rule (``calibrate_confidence``) that
        keeps ``target_precision`` when each of a sample of enrolled photos (sources not
        starting with ``exclude_prefix``, of products with another vector) queries the index
        with itself left out: its product's prototype (or, with "max", its product's best photo)
        is recomputed without it and, with ``holdout`` > 0, without that fraction of its
        product's photos most like it (at least itself, never all). Why: review photos come in
        bursts of near-duplicates (one session, one shelf), and a photo's twins left in make the
        query far easier than a customer's photo from another day: on grocery, leaving one photo
        out answers 97 % right and its cut answers every val/ query at 0.79 precision; leaving
        the nearest half out answers 78 % right, as the val/ queries are (79 %). Uses the stored
        vectors only. ``queries`` 0 when no photo qualifies."""
        out = self.leave_one_out_outcomes(max_queries, seed, exclude_prefix, holdout)
        if out is None:
            return {"threshold": None, "queries": 0, "method": "leave-one-out", "rule": rule,
                    "holdout": holdout, "target_precision": target_precision}
        out = calibrate_confidence(*out, target_precision, rule)
        out.update(method="leave-one-out", holdout=holdout)
        return out

    def leave_one_out_outcomes(self, max_queries: int = 2000, seed: int = 0,
                               exclude_prefix: str = "catalogue/",
                               holdout: float = DEFAULT_CALIBRATION_HOLDOUT):
        """(best score, runner-up score, best is right) per leave-one-out query (see
        ``calibrate_leave_one_out``), or None when no photo qualifies."""
        if not 0 <= holdout < 1:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        sources = self.sources()
        ids, inverse = np.unique(self._product_ids, return_inverse=True)
        per_row = np.bincount(inverse, minlength=len(ids))[inverse]
        eligible = [i for i, s in enumerate(sources)
                    if not s.startswith(exclude_prefix) and per_row[i] >= 2]
        if not eligible:
            return None
        if len(eligible) > max_queries:
            eligible = calibration_sample(eligible, sources, max_queries, seed)
        if self.aggregation == "prototype":
            return self._prototype_leave_one_out(np.asarray(eligible), inverse, holdout)
        return self._max_leave_one_out(eligible, ids, inverse, holdout)

    def _prototype_leave_one_out(self, eligible: np.ndarray, pos: np.ndarray, holdout: float):
        """Prototype aggregation: per query, its product's prototype without the left-out photos
        against the other products' nearest prototypes. Vectorised by product (one matrix
        product per product for the holdout, one for the sums left out) because the per-query
        loop was most of a refresh's calibration at 10,000 photos. ``pos``: each row's product
        position among the prototypes (the sorted product ids)."""
        pids, protos, ann = self._product_prototypes()
        queries = self._vectors[eligible].astype(np.float32)
        own = pos[eligible]
        # Each product's rows, ascending: the rows sorted by product, stably.
        by_product = np.argsort(pos, kind="stable")
        first = np.searchsorted(pos[by_product], np.arange(len(pids) + 1))
        left_out_sum = np.zeros((len(eligible), self.dim), np.float64)
        grouped = np.argsort(own, kind="stable")
        for group in np.split(grouped, np.flatnonzero(np.diff(own[grouped])) + 1):
            product = own[group[0]]
            mine = by_product[first[product]:first[product + 1]]
            n = holdout_count(len(mine), holdout)
            mine_vecs = self._vectors[mine].astype(np.float32)
            similar = queries[group] @ mine_vecs.T
            # The query itself first, then its product's photos most like it (ties by row).
            similar[np.arange(len(group)), np.searchsorted(mine, eligible[group])] = np.inf
            nearest = np.argsort(-similar, axis=1, kind="stable")[:, :n]
            chosen = np.zeros(similar.shape, np.float64)
            np.put_along_axis(chosen, nearest, 1.0, axis=1)
            # float64: a sum of float16 values is exact in any order, so an incremental refresh
            # and a full rebuild (other row orders) score every query identically.
            left_out_sum[group] = chosen @ mine_vecs.astype(np.float64)
        own_score = np.einsum("qd,qd->q", l2_normalise(self._prototype_sums[own] - left_out_sum),
                              queries).astype(np.float64)

        _, found = ann.search(queries, min(len(pids), 8))
        others = np.full(found.shape, -np.inf)
        for b in range(0, len(found), 256):  # bounded (256, 8, dim) gathers
            f = found[b:b + 256]
            valid = (f >= 0) & (f != own[b:b + 256, None])
            scores = np.einsum("qkd,qd->qk", protos[np.maximum(f, 0)], queries[b:b + 256])
            others[b:b + 256] = np.where(valid, scores, -np.inf)
        others = -np.sort(-others, axis=1)
        o1 = others[:, 0]
        o2 = others[:, 1] if others.shape[1] > 1 else np.full(len(o1), -np.inf)
        alone = np.isneginf(o1)
        correct = alone | (own_score >= o1)
        best = np.where(correct, own_score, o1)
        runner = np.where(correct, o1, np.maximum(own_score, o2))
        runner = np.where(alone, NO_RUNNER_UP, runner)
        return best, runner, correct

    def _max_leave_one_out(self, eligible: list[int], ids: np.ndarray, inverse: np.ndarray,
                           holdout: float):
        """Max aggregation: per query, every product's best photo but the left-out ones."""
        vecs = self._vectors.astype(np.float32)
        rows_of = {int(pid): np.flatnonzero(inverse == i) for i, pid in enumerate(ids)}

        def left_out(row: int) -> np.ndarray:
            """The query's row and, with a holdout, its product's photos most like it."""
            mine = rows_of[int(self._product_ids[row])]
            n = holdout_count(len(mine), holdout)
            if n <= 1:
                return np.array([row])
            nearest = mine[np.argsort(-(vecs[mine] @ vecs[row]), kind="stable")]
            return np.unique(np.r_[row, nearest[nearest != row][:n - 1]])

        s1, s2, correct = [], [], []
        want = min(len(self), max(64, 16 * min(len(ids), 8)))
        _, found = self._photo_ann().search(vecs[eligible], want)
        for row, cand in zip(eligible, found):
            cand = cand[(cand >= 0) & ~np.isin(cand, left_out(row))]
            scores = vecs[cand] @ vecs[row]
            best_of: dict[int, float] = {}
            for r, sc in zip(cand, scores):
                pid = int(self._product_ids[r])
                if sc > best_of.get(pid, -np.inf):
                    best_of[pid] = float(sc)
            ranked = sorted(best_of.items(), key=lambda kv: -kv[1])
            best, runner = confidence_inputs([sc for _, sc in ranked])
            s1.append(best)
            s2.append(runner)
            correct.append(ranked[0][0] == int(self._product_ids[row]))
        return np.array(s1), np.array(s2), np.array(correct, dtype=bool)

    # --- persistence --------------------------------------------------------------------------
    def config(self) -> dict:
        return {"format": FORMAT, "embedding": self._embedding_config or self.embedder.config(),
                "dim": self.dim,
                "metric": "cosine", "aggregation": self.aggregation, "nprobe": self.nprobe,
                "threshold": self.threshold, "vectors": len(self),
                "products": len(set(self._product_ids.tolist())),
                "registered_products": len(self.products),
                "ann": ann_factory(len(self)) if len(self) else None,
                "chunks": [c["file"] for c in self._chunks], "built_at": self.built_at}

    def save(self, root: str | Path) -> Path:
        """Write the index; to the directory it was loaded from, only the new chunks are written
        (with more than ``COMPACT_ABOVE_CHUNKS`` chunks, the small ones are also written again
        as few, and their old files deleted once index.json no longer lists them)."""
        import faiss

        root = Path(root)
        same = self.root is not None and self.root.resolve() == root.resolve()
        if self.aggregation == "max" and len(self) and ann_factory(len(self)) != "Flat":
            self._photo_ann()  # a max index's readers need its trained structure: saved with it
        (root / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        if not same:
            for c in self._chunks:
                c["file"] = None
            self.embedder.save(root / EMBEDDING_DIR)
        elif not (root / EMBEDDING_DIR / "embedding.json").is_file():
            self.embedder.save(root / EMBEDDING_DIR)
        small = [c for c in self._chunks if len(c["product_ids"]) < CHUNK_VECTORS // 4]
        if len(self._chunks) > COMPACT_ABOVE_CHUNKS and len(small) > 1:
            for c in small:  # written again, joined with their neighbours (one alone: left)
                c["file"] = None
        taken = {c["file"] for c in self._chunks if c["file"]}
        self._chunks = _merged_unsaved(self._chunks)
        for c in self._chunks:
            if c["file"] is None:
                name = _next_chunk_name(root, taken)
                tmp = root / CHUNK_DIR / f".{name}.tmp.npz"
                np.savez(tmp, vectors=c["vectors"], product_ids=c["product_ids"],
                         sources=c["sources"])
                os.replace(tmp, root / CHUNK_DIR / name)
                c["file"] = name
                taken.add(name)
        ann_name = f"ann-{len(self)}.faiss" if self._ann_is_stored() else None
        if ann_name:
            faiss.write_index(self._ann, str(root / f".{ann_name}.tmp"))
            os.replace(root / f".{ann_name}.tmp", root / ann_name)
        _atomic_write(root / PRODUCTS_FILE, json.dumps(sorted(self.products.values(),
                                                              key=lambda p: p["product_id"]),
                                                       ensure_ascii=False, indent=0))
        self.built_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        config = self.config()
        config["ann_file"] = ann_name
        # index.json last: until it is replaced, the previous version stays what loads.
        _atomic_write(root / INDEX_FILE, json.dumps(config, indent=1, ensure_ascii=False))
        for old in root.glob("ann-*.faiss"):
            if old.name != ann_name:
                old.unlink(missing_ok=True)
        listed = {c["file"] for c in self._chunks}
        for old in (root / CHUNK_DIR).glob("*.npz"):  # compacted away (links: a parent keeps its)
            if old.name not in listed and not old.name.startswith("."):
                old.unlink(missing_ok=True)
        self._stored_ann = (root / ann_name, self._ann_factory, len(self)) if ann_name else None
        self.root = root
        return root

    def _ann_is_stored(self) -> bool:
        """Only a trained (IVF) structure that was made is saved: an exact one is the stored
        vectors themselves, rebuilt from the chunks on load in about the time reading it would
        take, so a version that adds one chunk writes and uploads that chunk, not the whole ANN
        again; a prototype index never makes one (``_photo_ann``)."""
        return self._ann is not None and self._ann_factory != "Flat"

    @classmethod
    def load(cls, root: str | Path, settings: Settings | None = None) -> "SearchIndex":
        import faiss

        from shoplens.vision.embedding import EmbeddingError

        root = Path(root)
        try:
            config = json.loads((root / INDEX_FILE).read_text())
            products = json.loads((root / PRODUCTS_FILE).read_text())
        except FileNotFoundError as exc:
            raise SearchIndexError(f"{root} is not a search index ({Path(exc.filename).name} "
                                   "missing)") from None
        except ValueError as exc:
            raise SearchIndexError(f"{root}: unreadable index files ({exc})") from None
        if config.get("format") != FORMAT:
            raise SearchIndexError(f"{root}: index format {config.get('format')!r} is not {FORMAT}")
        try:
            embedder = Embedder.load(root / EMBEDDING_DIR, settings)
        except EmbeddingError as exc:
            raise SearchIndexError(str(exc)) from None
        index = cls(embedder, config["aggregation"], int(config.get("nprobe", 32)),
                    dim=config.get("dim"), embedding_config=config.get("embedding"))
        index.add_products(products)
        index.threshold = config.get("threshold")
        index.built_at = config.get("built_at")
        vectors, pids = [], []
        for name in config["chunks"]:
            try:
                with np.load(root / CHUNK_DIR / name) as z:
                    chunk = {"vectors": z["vectors"], "product_ids": z["product_ids"],
                             "sources": z["sources"], "file": name}
            except (OSError, KeyError, ValueError) as exc:
                raise SearchIndexError(f"{root}: cannot read chunk {name} ({exc})") from None
            index._chunks.append(chunk)
            vectors.append(chunk["vectors"])
            pids.append(chunk["product_ids"])
            index._sources.update(chunk["sources"].tolist())
        if vectors:
            index._matrix = np.concatenate(vectors)
            index._matrix_pids = np.concatenate(pids)
            index._count = len(index._matrix_pids)
        if len(index) != config["vectors"]:
            raise SearchIndexError(f"{root}: {len(index)} vectors in chunks, index.json says "
                                   f"{config['vectors']}")
        ann_file = config.get("ann_file")
        if len(index) and ann_file and (root / ann_file).is_file():  # read on first use
            index._stored_ann = (root / ann_file, config["ann"], len(index))
        index.root = root
        return index


def _merged_unsaved(chunks: list[dict], limit: int | None = None) -> list[dict]:
    """The chunks with each run of unsaved ones (added since the last save, one per addition:
    a refresh adds one per embedding batch) joined into chunks of at most ``limit`` vectors
    (default ``CHUNK_VECTORS``), in the same order: a night writes and uploads a few files, not
    one per batch."""
    limit = CHUNK_VECTORS if limit is None else limit
    out: list[dict] = []
    run: list[dict] = []
    size = 0

    def close_run():
        nonlocal size
        if run:
            out.append(run[0] if len(run) == 1 else {
                "vectors": np.concatenate([c["vectors"] for c in run]),
                "product_ids": np.concatenate([c["product_ids"] for c in run]),
                "sources": np.concatenate([c["sources"] for c in run]), "file": None})
            run.clear()
            size = 0

    for chunk in chunks:
        if chunk["file"] is not None:
            close_run()
            out.append(chunk)
            continue
        if run and size + len(chunk["product_ids"]) > limit:
            close_run()
        run.append(chunk)
        size += len(chunk["product_ids"])
    close_run()
    return out


def _next_chunk_name(root: Path, taken: set) -> str:
    existing = {p.name for p in (root / CHUNK_DIR).glob("*.npz")} | taken
    i = len(existing)
    while f"{i:06d}.npz" in existing:
        i += 1
    return f"{i:06d}.npz"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)

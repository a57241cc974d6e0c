"""Benchmark: open-set product search on the grocery photos (81 products).

Protocol (issue 16, "Measure"): products with an odd Class ID are *novel*, even ones *seen*.
The embedding head trains on the seen products' ``train/`` photos only. The index enrols all 81
products from their ``train/`` photos and their iconic catalogue image. Queries are the ``val/``
photos (or ``--queries-root DIR --queries-list FILE``, lines ``path, fine_label, coarse_label``).

Reported (``--out``, default results/search_grocery.json):
- ``baseline`` / ``trained``: R@1 and R@3 for novel and seen queries: the untrained ImageNet
  embedding (``--pooling``: average or GeM) vs the learned one. ``trained`` is the learned
  whitening fitted in closed form on the seen products' ``train/`` features (``--whiten-dim``,
  ``--whiten-reg``; see shoplens/vision/embedding.py); ``head`` the metric-learning (CosFace)
  head trained on the same photos (``--epochs 0`` skips it);
- ``aggregation``: the same for "max" (best photo per product) and "prototype" (mean per product);
- ``ensemble`` (with ``--ensemble DIR``): that closed-set ensemble's Top-1/Top-3 on the seen queries;
- ``catalogue_only``: R@1 when each product is enrolled by its catalogue image alone;
- ``seen_like_for_like``: per embedding, the seen queries answered as a closed-set model answers
  them (only the seen products enrolled; a linear softmax probe on the same vectors), next to the
  open-set answer, and what took the top of the open-set misses (a novel or another seen product);
- ``threshold``: the "no confident match" threshold of the ``trained`` embedding, chosen on one
  half of the queries and applied to the other (both ways, pooled): precision and coverage of
  the answered queries; ``threshold_seen_to_novel``: chosen on the seen products' queries only and
  applied to the novel products' queries (the threshold never sees the queries it is measured on);
- ``confidence_rules``: the same embedding's "no confident match" rules (``top1``: the best score,
  ``margin``: best minus runner-up product, ``combined``: logistic regression on both; see
  modeling/search_index.py), precision / coverage of the answered queries, all / novel / seen,
  under three protocols: ``product`` (what a refresh does: the cut is fitted by leave-one-out over
  the index's enrolled ``train/`` photos, up to ``--calibration-queries`` of them, each leaving
  its product's most similar photos out per ``search_calibration_holdout``, and applied to the
  ``val/`` queries, which it never saw; ``product_holdout_0`` the plain leave-one-out),
  ``two_fold`` and ``seen_to_novel`` (as ``threshold``);
- ``latency_ms``: one query (decode + embed + search) on one core, p50/p95, in a child process,
  as the service runs it (the frozen ONNX network), with the Keras network's in another child
  as the same run's baseline (``keras``, ``p95_ratio_to_keras``);
- ``wall_s`` and the machine's load average.

    nice -n 10 env TF_NUM_INTRAOP_THREADS=2 .venv/bin/python benchmarks/search_grocery.py
    .venv/bin/python benchmarks/search_grocery.py --classes 6 --per-class 8 --views 1 --epochs 5  # smoke

The backbone's features are cached under --work (keyed by backbone, size and photo list), so a
rerun with other head settings skips the expensive part.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GROCERY = Path(os.environ.get("SHOPLENS_SHARED_DIR", REPO.parent / "shared")) / "datasets" / "grocery"
PRODUCT_BASE = 1_000_000  # product_id = base + Class ID, as benchmarks/train_grocery.py does
TARGETS = {"novel_R@1": 0.80, "novel_R@3": 0.93, "threshold_precision": 0.95,
           "seen_R@1_vs_ensemble_points": 2, "latency_p95_ms": 150, "wall_s": 3600}


def read_classes(root: Path) -> list[dict]:
    out = []
    with (root / "classes.csv").open() as f:
        for row in csv.DictReader(f):
            label = int(row["Class ID (int)"])
            iconic = row.get("Iconic Image Path (str)", "").strip().lstrip("/")
            out.append({"label": label, "product_id": PRODUCT_BASE + label,
                        "name": row["Class Name (str)"],
                        "iconic": str(root / iconic) if iconic and (root / iconic).is_file() else None})
    return sorted(out, key=lambda c: c["label"])


def read_listing(root: Path, listing: Path) -> list[tuple[str, int]]:
    """(absolute path, fine label) per line ``path, fine_label, coarse_label``."""
    out = []
    for n, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2:
            raise SystemExit(f"error: {listing}:{n}: expected 'path, fine_label, coarse_label'")
        out.append((str(root / parts[0]), int(parts[1])))
    return out


def is_novel(label: int) -> bool:
    return label % 2 == 1


def recall(hits: list[list], truth: list[int], k: int) -> float | None:
    if not truth:
        return None
    return round(float(np.mean([t in [h.product_id for h in hs[:k]] for hs, t in zip(hits, truth)])), 4)


def split_scores(hits, truth_pids, labels) -> dict:
    out = {}
    for name, pick in (("novel", is_novel), ("seen", lambda lab: not is_novel(lab))):
        idx = [i for i, lab in enumerate(labels) if pick(lab)]
        h, t = [hits[i] for i in idx], [truth_pids[i] for i in idx]
        out[name] = {"R@1": recall(h, t, 1), "R@3": recall(h, t, 3), "n": len(idx)}
    return out


def pooling_key(embedder) -> str:
    return ("" if embedder.pooling == "avg" else f"gem{embedder.gem_p:g}-") + \
        ("flip-" if embedder.flip_tta else "")


def features_cached(embedder, paths: list[str], cache: Path, weights: str = "") -> np.ndarray:
    """Clean (centre-crop) backbone features of the photos, cached on disk by photo list
    (``weights``: what tells fine-tuned backbones apart, see :func:`tuned_backbones`)."""
    from shoplens.vision import images

    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    f = cache / (f"{embedder.backbone}-{embedder.image_size}-{pooling_key(embedder)}"
                 f"{weights and weights + '-'}clean-{key}.npy")
    if f.is_file():
        return np.load(f)
    feats = embedder.features_decoded([images.decode(images.read_file(p), p) for p in paths])
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f, feats)
    return feats


def augmented_cached(embedder, paths: list[str], views: int, seed: int, cache: Path) -> np.ndarray:
    from shoplens.vision import images
    from modeling.embedding import augmented_features

    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    f = cache / (f"{embedder.backbone}-{embedder.image_size}-{pooling_key(embedder)}aug{views}"
                 f"-s{seed}-{key}.npy")
    if f.is_file():
        return np.load(f)
    decoded = [images.decode(images.read_file(p), p) for p in paths]
    feats = embedder.combine([augmented_features(part, part.squares(decoded), views, seed)
                              for part in embedder.parts])
    cache.mkdir(parents=True, exist_ok=True)
    np.save(f, feats)
    return feats


def tuned_backbones(ensemble_dir: str, base, work: Path):
    """(``base`` on the ensemble's fine-tuned members instead of its frozen ImageNet backbones,
    a cache key for their features: the members' files' digest)."""
    from modeling.ensemble import Ensemble
    from shoplens.checksums import file_sha256
    from shoplens.vision.embedding import Embedder

    ensemble = Ensemble.load(ensemble_dir)
    digest = hashlib.sha256("".join(
        file_sha256(ensemble.root / m["file"]) for m in ensemble.config["members"]).encode())
    members = ensemble.backbone_weights(work / "tuned_backbones", base.settings)
    wrong = [f"{part.backbone} at {part.image_size} px" for part in base.parts
             if members.get(part.backbone, {}).get("image_size") != part.image_size]
    if wrong:
        raise SystemExit(f"error: {ensemble_dir} has no member for {', '.join(wrong)} "
                         f"(members: {sorted(members)})")
    files = {part.backbone: members[part.backbone]["file"] for part in base.parts}
    single = len(files) == 1
    return Embedder(base.backbone, base.image_size, settings=base.settings, pooling=base.pooling,
                    gem_p=base.gem_p, flip_tta=base.flip_tta,
                    tuned_blocks=base.settings.model_finetune_blocks,
                    weights_file=next(iter(files.values())) if single else None,
                    part_weights=None if single else files), f"tuned{digest.hexdigest()[:12]}"


def build_index(embedder, classes, vectors, pids, sources, aggregation="prototype"):
    from modeling.search_index import SearchIndex

    index = SearchIndex(embedder, aggregation)
    index.add_products([{"product_id": c["product_id"], "name": c["name"]} for c in classes])
    index.add_vectors(vectors, pids, sources)
    return index


def cross_calibrated_threshold(index, q_vectors, truth, target=0.95) -> dict:
    """Threshold chosen on one half of the queries (alternate photos per product), measured on
    the other half, both ways; pooled precision and coverage of the answered held-out queries."""
    from modeling.search_index import calibrate_threshold, threshold_outcome

    hits = index.search_vectors(q_vectors, 1)
    scores = np.array([h[0].score for h in hits])
    correct = np.array([h[0].product_id == t for h, t in zip(hits, truth)])
    seen_count: dict[int, int] = {}
    half = np.zeros(len(truth), dtype=int)
    for i, t in enumerate(truth):
        half[i] = seen_count.get(t, 0) % 2
        seen_count[t] = seen_count.get(t, 0) + 1
    answered = right = 0
    folds = []
    for fold in (0, 1):
        cal, held = half == fold, half != fold
        chosen = calibrate_threshold(scores[cal], correct[cal], target)
        outcome = threshold_outcome(scores[held], correct[held], chosen["threshold"])
        folds.append({"calibrated_on": int(cal.sum()), **outcome})
        answered += outcome["answered"]
        right += int(correct[held][scores[held] >= chosen["threshold"]].sum())
    # Chosen on the seen products' queries only, measured on the novel products' queries.
    novel = np.array([is_novel(t - PRODUCT_BASE) for t in truth])
    on_seen = calibrate_threshold(scores[~novel], correct[~novel], target) if (~novel).any() else None
    seen_to_novel = threshold_outcome(scores[novel], correct[novel], on_seen["threshold"]) \
        if on_seen and novel.any() else None
    full = calibrate_threshold(scores, correct, target)
    return {"target_precision": target,
            "precision": round(right / answered, 4) if answered else None,
            "coverage": round(answered / len(truth), 4), "folds": folds,
            "seen_to_novel": seen_to_novel,
            "threshold_on_all_queries": full}


def rule_outcome(rule: str, chosen: dict, s1, s2, correct, groups: dict) -> dict:
    """Precision / coverage of a calibrated rule on (other) queries: all, and per group mask."""
    from modeling.search_index import confidence_values, threshold_outcome

    values = confidence_values(rule, s1, s2, chosen["weights"])
    out = {}
    for name, mask in {"all": np.ones(len(values), bool), **groups}.items():
        o = threshold_outcome(values[mask], correct[mask], chosen["cut"])
        out[name] = {k: (round(v, 4) if isinstance(v, float) else v)
                     for k, v in o.items() if k != "threshold"}
    return out


def confidence_rules_report(index, q_vectors, truth, target: float, calibration_queries: int,
                            seed: int, enrolled_exclude_prefix: str, holdouts: list[float]) -> dict:
    """Each confidence rule under the three protocols (module docstring, ``confidence_rules``);
    ``product`` once per leave-one-out holdout (``product`` is the first, the setting's)."""
    from modeling.search_index import CONFIDENCE_RULES, calibrate_confidence

    s1, s2, correct = index.ranked_outcomes(q_vectors, truth)
    novel = np.array([is_novel(t - PRODUCT_BASE) for t in truth])
    groups = {"novel": novel, "seen": ~novel}
    half = np.zeros(len(truth), dtype=int)
    count: dict[int, int] = {}
    for i, t in enumerate(truth):
        half[i] = count.get(t, 0) % 2
        count[t] = count.get(t, 0) + 1
    out = {"target_precision": target, "queries": len(truth),
           "val_top1_right": round(float(correct.mean()), 4), "two_fold": {}, "seen_to_novel": {}}
    for n, holdout in enumerate(holdouts):
        loo = index.leave_one_out_outcomes(calibration_queries, seed, enrolled_exclude_prefix,
                                           holdout)
        product = {"calibrated_on": "leave-one-out over the enrolled train/ photos",
                   "holdout": holdout, "calibration_queries": int(len(loo[0])),
                   "calibration_top1_right": round(float(loo[2].mean()), 4)}
        for rule in CONFIDENCE_RULES:
            chosen = calibrate_confidence(*loo, target, rule)
            product[rule] = {"cut": round(chosen["cut"], 4), "weights": chosen["weights"],
                             "on_calibration": {"precision": chosen["precision"],
                                                "coverage": round(chosen["coverage"], 4)},
                             "on_val": rule_outcome(rule, chosen, s1, s2, correct, groups)}
        out["product" if n == 0 else f"product_holdout_{holdout:g}"] = product
    for rule in CONFIDENCE_RULES:
        # 2-fold: fitted on alternate photos per product, measured on the others, both ways.
        answered = {g: 0 for g in ("all", "novel", "seen")}
        right = dict(answered)
        for fold in (0, 1):
            cal, held = half == fold, half != fold
            chosen = calibrate_confidence(s1[cal], s2[cal], correct[cal], target, rule)
            held_out = rule_outcome(rule, chosen, s1[held], s2[held], correct[held],
                                    {"novel": novel[held], "seen": ~novel[held]})
            for g, o in held_out.items():
                answered[g] += o["answered"]
                right[g] += round((o["precision"] or 0) * o["answered"])
        sizes = {"all": len(truth), "novel": int(novel.sum()), "seen": int((~novel).sum())}
        out["two_fold"][rule] = {g: {"precision": round(right[g] / answered[g], 4)
                                     if answered[g] else None,
                                     "coverage": round(answered[g] / sizes[g], 4),
                                     "answered": answered[g], "queries": sizes[g]}
                                 for g in answered}
        if novel.any() and (~novel).any():
            chosen = calibrate_confidence(s1[~novel], s2[~novel], correct[~novel], target, rule)
            out["seen_to_novel"][rule] = rule_outcome(rule, chosen, s1[novel], s2[novel],
                                                      correct[novel], {})["all"]
    return out


def latency_child(index_dir: str, network: str, paths: list[str], warmup: int = 3) -> None:
    """Runs in a child pinned to one core: per photo, decode + embed + search, timed. ``network``
    ``frozen``: the index loaded as the service and the search command load it
    (``catalogue_index.load_for_queries``: the frozen ONNX network, made once in a cache folder
    beside the index, before the timed photos); ``keras``: the Keras network (the baseline)."""
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    from shoplens.config import Settings
    from shoplens.vision import images
    from modeling import catalogue_index
    from modeling.search_index import SearchIndex

    if network == "frozen":
        settings = Settings.from_env().with_overrides(
            search_cache_dir=str(Path(index_dir).parent / "query-cache"))
        index = catalogue_index.load_for_queries(index_dir, settings)
    else:
        index = SearchIndex.load(index_dir)
    times = []
    for i, p in enumerate(paths):
        t0 = time.perf_counter()
        img = images.decode(images.read_file(p), p)
        index.answer(index.embedder.embed_decoded([img])[0], 3)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    print(json.dumps({"n": len(times), "p50": round(float(np.percentile(times, 50)), 1),
                      "p95": round(float(np.percentile(times, 95)), 1)}))


def measure_latency(index_dir: Path, paths: list[str]) -> dict:
    """The product's query path (frozen network) and the Keras baseline, one child each, in
    turn on the same photos; their p95 ratio."""
    env = {**os.environ, "TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = {}
    for network in ("frozen", "keras"):
        proc = subprocess.run([sys.executable, __file__, "--latency-child", str(index_dir),
                               network, *paths], env=env, capture_output=True, text=True,
                              timeout=1800)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
        out[network] = json.loads(proc.stdout.strip().splitlines()[-1])
    return {**out["frozen"], "keras": out["keras"],
            "p95_ratio_to_keras": round(out["frozen"]["p95"] / out["keras"]["p95"], 3),
            "cores": 1, "load_average": os.getloadavg()}


def ensemble_scores(ensemble_dir: str, paths: list[str], labels: list[int]) -> dict:
    """The closed-set ensemble's Top-1/Top-3 on the seen-product queries."""
    from shoplens.vision import images
    from modeling.ensemble import Ensemble

    ens = Ensemble.load(ensemble_dir)
    pick = [i for i, lab in enumerate(labels) if not is_novel(lab)]
    top1 = top3 = 0
    for start in range(0, len(pick), 32):
        part = pick[start:start + 32]
        probs = ens.predict_probs_decoded([images.decode(images.read_file(paths[i]), paths[i])
                                           for i in part])
        for i, p in zip(part, probs):
            top = [e["product_id"] for e in ens.top_k(p, 3)]
            want = PRODUCT_BASE + labels[i]
            top1 += top[0] == want
            top3 += want in top
    n = len(pick)
    return {"seen": {"Top-1": round(top1 / n, 4) if n else None,
                     "Top-3": round(top3 / n, 4) if n else None, "n": n},
            "model": ens.model_id}


def linear_probe(train_vectors: np.ndarray, train_labels, l2: float = 1e-3, scale: float = 30.0):
    """A softmax classifier over the seen products fitted on their ``train/`` vectors (L-BFGS,
    L2 ``l2``, logits = ``scale`` x vector . weights + bias): (predict(vectors) -> labels)."""
    from scipy.optimize import minimize

    labels = sorted(set(int(x) for x in train_labels))
    y = np.searchsorted(labels, np.asarray(train_labels))
    x = np.asarray(train_vectors, np.float64)
    (n, d), k = x.shape, len(labels)
    onehot = np.eye(k)[y]

    def loss(w):
        weights, bias = w[:d * k].reshape(d, k), w[d * k:]
        z = scale * (x @ weights) + bias
        z -= z.max(1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(1, keepdims=True)
        g = (p - onehot) / n
        value = -np.mean(np.log(p[np.arange(n), y] + 1e-12)) + l2 * np.sum(weights ** 2)
        return value, np.concatenate([(scale * x.T @ g + 2 * l2 * weights).ravel(), g.sum(0)])

    w = minimize(loss, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                 options={"maxiter": 500}).x
    weights, bias = w[:d * k].reshape(d, k), w[d * k:]
    return lambda v: np.asarray(labels)[np.argmax(np.asarray(v) @ weights * scale + bias, 1)]


SEEN_FIRST_BIASES = (-0.02, 0.0, 0.01, 0.02, 0.03, 0.05)


def seen_first_sweep(all_hits, q_labels, probe_labels, biases=SEEN_FIRST_BIASES) -> list[dict]:
    """What a search that trusts a closed-set classifier for the seen products could reach:
    per query, the classifier's product when the best seen product's similarity plus ``bias``
    is at least the best novel product's, else that novel product (``all_hits``: every
    product ranked). R@1 of novel and seen queries per bias: the price in novel products of
    each seen query won."""
    rows = []
    novel_q = np.array([is_novel(lab) for lab in q_labels])
    for bias in biases:
        right = []
        for hits, lab, probe in zip(all_hits, q_labels, probe_labels):
            best_seen = max((h.score for h in hits if not is_novel(h.product_id - PRODUCT_BASE)),
                            default=-np.inf)
            novel = [h for h in hits if is_novel(h.product_id - PRODUCT_BASE)]
            top = probe if not novel or best_seen + bias >= novel[0].score else \
                novel[0].product_id - PRODUCT_BASE
            right.append(top == lab)
        right = np.array(right)
        rows.append({"bias": bias, **{f"{group}_R@1": round(float(right[mask].mean()), 4)
                                      if mask.any() else None
                                      for group, mask in (("novel", novel_q), ("seen", ~novel_q))}})
    return rows


def seen_like_for_like(emb, enrol_vectors, enrol_labels, train_count: int, q_vectors, q_labels,
                       open_hits, aggregation: str, classes, open_index=None) -> dict:
    """The seen queries three ways, to compare with a closed-set model (which chooses among the
    seen products only): the open-set answer (all products enrolled); the same embedding with
    only the seen products enrolled (``closed_set``); a linear softmax probe on the same vectors
    (a closed-set classifier at no backbone cost, fitted like the ensemble on the seen
    products' ``train/`` photos: the first ``train_count`` enrolled rows). ``open_set_misses``:
    seen queries whose open-set top-1 is wrong, by what took the top: a novel product or another
    seen one. With ``open_index`` (the open-set index), also :func:`seen_first_sweep` over every
    query."""
    enrol_labels = np.asarray(enrol_labels)
    seen_enrol = ~np.array([is_novel(int(x)) for x in enrol_labels])
    seen_q = [i for i, lab in enumerate(q_labels) if not is_novel(lab)]
    if not seen_q or not seen_enrol.any():
        return {}
    truth = [PRODUCT_BASE + q_labels[i] for i in seen_q]
    closed = build_index(emb, [c for c in classes if not is_novel(c["label"])],
                         enrol_vectors[seen_enrol],
                         [PRODUCT_BASE + int(x) for x in enrol_labels[seen_enrol]],
                         [str(i) for i in np.flatnonzero(seen_enrol)], aggregation)
    closed_hits = closed.search_vectors(q_vectors[seen_q], 3)
    train_rows = seen_enrol & (np.arange(len(enrol_labels)) < train_count)
    probe_all = linear_probe(enrol_vectors[train_rows], enrol_labels[train_rows])(q_vectors)
    probe = probe_all[seen_q]
    top = [open_hits[i][0].product_id - PRODUCT_BASE for i in seen_q]
    wrong = [t for t, i in zip(top, seen_q) if t != q_labels[i]]
    every = open_index.search_vectors(q_vectors, len(classes)) if open_index is not None else None
    return {"n": len(seen_q),
            "open_set": {"R@1": recall([open_hits[i] for i in seen_q], truth, 1),
                         "R@3": recall([open_hits[i] for i in seen_q], truth, 3)},
            "closed_set": {"R@1": recall(closed_hits, truth, 1), "R@3": recall(closed_hits, truth, 3)},
            "linear_probe": {"Top-1": round(float(np.mean(probe == np.asarray(q_labels)[seen_q])), 4)},
            "open_set_misses": {"novel_product_on_top": sum(map(is_novel, wrong)),
                                "other_seen_product_on_top": sum(not is_novel(t) for t in wrong)},
            **({"seen_first": seen_first_sweep(every, q_labels, probe_all)}
               if every is not None else {})}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grocery", type=Path, default=GROCERY)
    ap.add_argument("--queries-root", type=Path, help="root of the query photos' paths")
    ap.add_argument("--queries-list", type=Path, help="listing 'path, fine_label, coarse_label'")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "search_grocery.json")
    ap.add_argument("--work", type=Path, default=REPO / ".run" / "search_grocery")
    ap.add_argument("--ensemble", help="an exported closed-set ensemble directory")
    ap.add_argument("--tuned-backbones", metavar="ENSEMBLE_DIR",
                    help="the trained embedding runs on this closed-set ensemble's fine-tuned "
                         "members (one per --backbone, trained on the seen products only) "
                         "instead of the frozen ImageNet backbones; the baseline stays ImageNet")
    # The defaults: benchmarks/search_grocery_select.py's choice among whitened settings, made
    # on the seen products alone (docs/benchmarks.md).
    ap.add_argument("--backbone",
                    default="efficientnet_lite0+efficientnet_lite1+efficientnet_lite2",
                    help="several joined by '+': their L2-normalised features concatenated")
    ap.add_argument("--pooling", default="avg", choices=("avg", "gem"))
    ap.add_argument("--gem-p", type=float, default=3.0)
    ap.add_argument("--flip-tta", action=argparse.BooleanOptionalAction, default=False,
                    help="average each crop's and its mirror image's features (2x the backbone "
                         "work: over the 150 ms query budget with three backbones)")
    ap.add_argument("--whiten-dim", type=int, default=512)
    ap.add_argument("--whiten-reg", type=float, default=1.0)
    ap.add_argument("--image-size", type=int, default=0)
    ap.add_argument("--views", type=int, default=2, help="augmented views per training photo")
    ap.add_argument("--epochs", type=int, default=40, help="CosFace head epochs (0: no head)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--margin", type=float, default=0.2)
    ap.add_argument("--scale", type=float, default=30.0)
    ap.add_argument("--finetune-blocks", type=int, default=0,
                    help="also fine-tune the backbone's top N blocks with the head (0: head only)")
    ap.add_argument("--finetune-epochs", type=int, default=3)
    ap.add_argument("--finetune-learning-rate", type=float, default=2e-4)
    ap.add_argument("--classes", type=int, default=0, help="only the first N products (smoke)")
    ap.add_argument("--per-class", type=int, default=0, help="at most N train photos per product")
    ap.add_argument("--latency-queries", type=int, default=40)
    ap.add_argument("--target-precision", type=float, default=0.95,
                    help="precision the confidence rules' cuts keep on their calibration queries")
    ap.add_argument("--calibration-queries", type=int, default=0,
                    help="enrolled photos the product protocol's leave-one-out calibration uses "
                         "(0: the setting search_calibration_queries)")
    ap.add_argument("--calibration-holdouts", type=float, nargs="+",
                    help="leave-one-out holdouts for the product protocol, the first reported as "
                         "'product' (default: the setting search_calibration_holdout, then 0)")
    ap.add_argument("--latency-child", nargs="+", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.latency_child:
        latency_child(args.latency_child[0], args.latency_child[1], args.latency_child[2:])
        return 0
    if not (args.grocery / "classes.csv").is_file():
        print(f"skipped: needs {args.grocery} (absent on this machine)")
        return 0
    if bool(args.queries_root) != bool(args.queries_list):
        print("error: --queries-root and --queries-list go together", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from shoplens.vision import images
    from modeling.embedding import Embedder, HeadTraining, finetune_embedding, train_head
    from shoplens.vision.embedding import learned_whitening
    from shoplens.config import Settings

    load_start = os.getloadavg()
    t0 = time.monotonic()
    classes = read_classes(args.grocery)
    if args.classes:
        classes = classes[:args.classes]
    wanted = {c["label"] for c in classes}
    train = [(p, lab) for p, lab in read_listing(args.grocery, args.grocery / "train.txt")
             if lab in wanted]
    if args.per_class:
        kept, count = [], {}
        for p, lab in train:
            if count.get(lab, 0) < args.per_class:
                kept.append((p, lab))
                count[lab] = count.get(lab, 0) + 1
        train = kept
    if args.queries_list:
        queries = read_listing(args.queries_root, args.queries_list)
    else:
        queries = read_listing(args.grocery, args.grocery / "val.txt")
    queries = [(p, lab) for p, lab in queries if lab in wanted]
    q_paths, q_labels = [p for p, _ in queries], [lab for _, lab in queries]
    q_pids = [PRODUCT_BASE + lab for lab in q_labels]
    iconic = [(c["iconic"], c["label"]) for c in classes if c["iconic"]]

    base = Embedder(args.backbone, args.image_size, settings=Settings.from_env(),
                    pooling=args.pooling, gem_p=args.gem_p, flip_tta=args.flip_tta)
    cache = args.work / "features"
    t_feat = time.monotonic()
    f_train = features_cached(base, [p for p, _ in train], cache)
    f_iconic = features_cached(base, [p for p, _ in iconic], cache) if iconic else None
    f_query = features_cached(base, q_paths, cache)
    seen_train = [(p, lab) for p, lab in train if not is_novel(lab)]
    seen_rows = [i for i, (_, lab) in enumerate(train) if not is_novel(lab)]
    seen_labels = np.array([lab for _, lab in seen_train])
    # The trained embedding's backbones: the same frozen ones, or the ensemble's fine-tuned.
    w_base, w_feats = base, (f_train, f_iconic, f_query)
    if args.tuned_backbones:
        w_base, tag = tuned_backbones(args.tuned_backbones, base, args.work)
        w_feats = (features_cached(w_base, [p for p, _ in train], cache, tag),
                   features_cached(w_base, [p for p, _ in iconic], cache, tag) if iconic else None,
                   features_cached(w_base, q_paths, cache, tag))
    # The learned whitening: closed form, on the seen products' clean train features only.
    t_w = time.monotonic()
    whitened = w_base.with_whitening(
        learned_whitening(w_feats[0][seen_rows], seen_labels, args.whiten_dim, args.whiten_reg),
        {"method": "learned whitening (within-product covariance)",
         "fitted_on": "seen products' train/ photos", "photos": len(seen_rows),
         "products": len(set(seen_labels.tolist())), "dim": args.whiten_dim,
         "regularisation": args.whiten_reg, "pooling": base.pooling, "gem_p": base.gem_p,
         "backbones": f"fine-tuned members of {args.tuned_backbones}" if args.tuned_backbones
         else "frozen ImageNet"})
    whitened.report["seconds"] = round(time.monotonic() - t_w, 2)
    cfg = HeadTraining(dim=args.dim, epochs=args.epochs, margin=args.margin, scale=args.scale)
    head_report = {"skipped": "--epochs 0", "seconds": 0}
    trained = None
    tuned_train, tuned_iconic, tuned_query = f_train, f_iconic, f_query
    if not args.epochs:
        t_feat = time.monotonic() - t_feat
    elif args.finetune_blocks:
        t_feat = time.monotonic() - t_feat
        trained = finetune_embedding(
            base, [images.decode(images.read_file(p), p) for p, _ in seen_train], seen_labels,
            blocks=args.finetune_blocks, epochs=args.finetune_epochs,
            learning_rate=args.finetune_learning_rate, views=args.views, cfg=cfg)
        head_report = trained.report
        t_tuned = time.monotonic()
        # The tuned backbone computes other features: every photo goes through it once more.
        tuned_train = trained.features(trained.centre_crops(trained.squares(
            [images.decode(images.read_file(p), p) for p, _ in train])))
        tuned_iconic = trained.features(trained.centre_crops(trained.squares(
            [images.decode(images.read_file(p), p) for p, _ in iconic]))) if iconic else None
        tuned_query = trained.features(trained.centre_crops(trained.squares(
            [images.decode(images.read_file(p), p) for p in q_paths])))
        head_report["tuned_features_seconds"] = round(time.monotonic() - t_tuned, 1)
    else:
        f_aug = augmented_cached(base, [p for p, _ in seen_train], args.views, 1234, cache) \
            if args.views else f_train[:0]
        t_feat = time.monotonic() - t_feat
        head, head_report = train_head(np.concatenate([f_train[seen_rows], f_aug]),
                                       np.tile(seen_labels, 1 + args.views), cfg)
        head_report.update(photos=len(seen_train), augmented_views=args.views)
        trained = base.with_head(head, head_report)
        tuned_train, tuned_iconic, tuned_query = f_train, f_iconic, f_query
    head_report["seen_products"] = len(set(seen_labels.tolist()))
    # Backbone features per embedding (the fine-tuned one has its own).
    feats = {"baseline": (f_train, f_iconic, f_query), "trained": w_feats,
             "head": (tuned_train, tuned_iconic, tuned_query)}
    embedders = {"baseline": base, "trained": whitened}
    if trained is not None:
        embedders["head"] = trained

    enrol_sources = [p for p, _ in train] + [p for p, _ in iconic]
    enrol_pids = [PRODUCT_BASE + lab for _, lab in train] + [PRODUCT_BASE + lab for _, lab in iconic]

    def enrol_feats(name):
        tr, ic, _ = feats[name]
        return np.concatenate([tr] + ([ic] if ic is not None else []))

    result: dict = {"benchmark": "search_grocery", "products": len(classes),
                    "novel_products": sum(is_novel(c["label"]) for c in classes),
                    "enrolled_photos": len(train), "catalogue_images": len(iconic),
                    "queries": {"n": len(queries), "novel": sum(map(is_novel, q_labels)),
                                "listing": str(args.queries_list or "val.txt")},
                    "backbone": base.backbone, "image_size": base.image_size,
                    "flip_tta": base.flip_tta, "pooling": base.pooling, "gem_p": base.gem_p if base.pooling == "gem" else None,
                    "whitening": whitened.report, "head": head_report, "aggregation": {}}
    indexes = {}
    for name, emb in embedders.items():
        q_vec = emb.project(feats[name][2])
        for agg in ("max", "prototype"):
            index = build_index(emb, classes, emb.project(enrol_feats(name)), enrol_pids,
                                enrol_sources, agg)
            t_s = time.monotonic()
            hits = index.search_vectors(q_vec, 3)
            search_ms = (time.monotonic() - t_s) * 1000 / max(1, len(q_vec))
            scores = split_scores(hits, q_pids, q_labels)
            result["aggregation"].setdefault(name, {})[agg] = {**scores,
                                                              "search_ms_per_query": round(search_ms, 3)}
            indexes[(name, agg)] = index
    # The headline uses each embedding's better aggregation on novel R@1 (both are reported).
    for name in embedders:
        per = result["aggregation"][name]
        best = max(per, key=lambda agg: (per[agg]["novel"]["R@1"] or 0, per[agg]["novel"]["R@3"] or 0))
        result[name] = {"novel": per[best]["novel"], "seen": per[best]["seen"], "aggregation": best}

    best_agg = result["trained"]["aggregation"]
    index = indexes[("trained", best_agg)]
    q_vec = whitened.project(feats["trained"][2])
    # The closed-set ensemble chooses among the seen products only; this says how much of the
    # seen-query gap to it is the novel products the search must also rank.
    enrol_labels = [lab for _, lab in train] + [lab for _, lab in iconic]
    result["seen_like_for_like"] = {}
    for name, emb in embedders.items():
        queries_embedded = emb.project(feats[name][2])
        result["seen_like_for_like"][name] = seen_like_for_like(
            emb, emb.project(enrol_feats(name)), enrol_labels, len(train), queries_embedded,
            q_labels, indexes[(name, result[name]["aggregation"])].search_vectors(
                queries_embedded, 3),
            result[name]["aggregation"], classes, index if name == "trained" else None)
    result["threshold"] = cross_calibrated_threshold(index, q_vec, q_pids, args.target_precision)
    result["threshold_baseline"] = cross_calibrated_threshold(
        indexes[("baseline", result["baseline"]["aggregation"])], base.project(f_query), q_pids,
        args.target_precision)
    settings = Settings.from_env()
    # Iconic images are the catalogue images: a refresh leaves them out of its calibration.
    iconic_prefix = os.path.commonpath([p for p, _ in iconic]) + os.sep if iconic else "\0"
    result["confidence_rules"] = confidence_rules_report(
        index, q_vec, q_pids, args.target_precision,
        args.calibration_queries or settings.search_calibration_queries, settings.model_seed,
        iconic_prefix, args.calibration_holdouts or
        list(dict.fromkeys([settings.search_calibration_holdout, 0.0])))

    if f_iconic is not None:
        cat = {}
        for name, emb in embedders.items():
            ci = build_index(emb, classes, emb.project(feats[name][1]),
                             [PRODUCT_BASE + lab for _, lab in iconic], [p for p, _ in iconic])
            hits = ci.search_vectors(emb.project(feats[name][2]), 3)
            cat[name] = {"R@1": recall(hits, q_pids, 1), "R@3": recall(hits, q_pids, 3),
                         **split_scores(hits, q_pids, q_labels)}
        result["catalogue_only"] = {**cat["trained"], **{k: v for k, v in cat.items()
                                                         if k != "trained"}}

    # The index a user would query (calibrated on all queries), saved for the CLI and latency.
    index.calibrate(q_vec, q_pids)
    index_dir = args.work / "index"
    if index_dir.exists():
        import shutil

        shutil.rmtree(index_dir)
    index.save(index_dir)
    result["index_dir"] = str(index_dir)
    result["seconds"] = {"backbone_features": round(t_feat, 1), "head": head_report["seconds"]}
    if args.ensemble:
        result["ensemble"] = ensemble_scores(args.ensemble, q_paths, q_labels)
    result["train_and_evaluate_s"] = round(time.monotonic() - t0, 1)
    if args.latency_queries:
        result["latency_ms"] = measure_latency(index_dir, q_paths[:args.latency_queries])
    result["wall_s"] = round(time.monotonic() - t0, 1)
    result.update(load_average_at_start=load_start, load_average_at_end=os.getloadavg(),
                  cpu_count=os.cpu_count(), targets=TARGETS,
                  threads={k: os.environ.get(k) for k in ("TF_NUM_INTRAOP_THREADS",
                                                          "TF_NUM_INTEROP_THREADS")})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False))
    for name in embedders:
        r = result[name]
        print(f"{name:9s} ({r['aggregation']:9s}) novel R@1 {r['novel']['R@1']}  R@3 {r['novel']['R@3']}"
              f"   seen R@1 {r['seen']['R@1']}  R@3 {r['seen']['R@3']}")
    for name, like in result["seen_like_for_like"].items():
        if like:
            print(f"{name:9s} seen queries: open set R@1 {like['open_set']['R@1']}, only the seen "
                  f"products enrolled {like['closed_set']['R@1']}, linear probe "
                  f"{like['linear_probe']['Top-1']}; open-set misses "
                  f"{like['open_set_misses']}")
        for row in like.get("seen_first", []):
            print(f"{name:9s} seen products first by the probe, bias {row['bias']:+.2f}: novel R@1 "
                  f"{row['novel_R@1']}, seen R@1 {row['seen_R@1']}")
    s2n = result["threshold"]["seen_to_novel"] or {}
    print(f"threshold seen->novel precision {s2n.get('precision')} coverage {s2n.get('coverage')}")
    print(f"threshold precision {result['threshold']['precision']} coverage "
          f"{result['threshold']['coverage']}")
    rules = result["confidence_rules"]
    others = [k for k in rules if k.startswith("product_holdout_")]
    print(f"product protocol: leave-one-out holdout {rules['product']['holdout']:g} "
          f"(top-1 right {rules['product']['calibration_top1_right']}; val/ "
          f"{rules['val_top1_right']})" + "".join(
              f"; holdout {rules[k]['holdout']:g}: top-1 right {rules[k]['calibration_top1_right']}"
              for k in others))
    for rule in rules["two_fold"]:
        cells = []
        for name, per in (("product", rules["product"][rule]["on_val"]),
                          *((k.replace("product_holdout_", "holdout "), rules[k][rule]["on_val"])
                            for k in others),
                          ("2-fold", rules["two_fold"][rule])):
            cells += [f"{name} {g} {per[g]['precision']}/{per[g]['coverage']}"
                      for g in ("all", "novel", "seen")]
        s2n = rules["seen_to_novel"].get(rule, {})
        cells.append(f"seen->novel {s2n.get('precision')}/{s2n.get('coverage')}")
        print(f"confidence {rule:8s} " + "  ".join(cells))
    print(f"wall {result['wall_s']} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

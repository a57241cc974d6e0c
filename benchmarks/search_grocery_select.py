"""Choosing the search embedding's settings without looking at the novel products.

Issue 16's open-set protocol keeps the odd Class IDs (the *novel* products) out of everything
that is fitted; this benchmark keeps them out of everything that is *chosen* as well. The
candidate settings (backbones, pooling, flip averaging, the learned whitening's width and
regularisation) are scored by a cross-validation on the 41 *seen* products only:

- ``--splits`` random 50/50 splits of the seen products (fixed ``--seed``);
- per split, the learned whitening is fitted on one half's ``train/`` photos and the other half's
  ``val/`` photos are the queries, searched against the full 81-product index (every product's
  ``train/`` photos and catalogue image, prototype ranking, as benchmarks/search_grocery.py);
- each split is used both ways; R@1 / R@3 are averaged over the 2 x splits folds.

Candidates: backbone sets x pooling x flip averaging x (no whitening, or the learned whitening's
width x regularisation); ``--whiten-mirrors`` adds, for every setting without flip averaging,
the whitening fitted on the fitting photos *and their mirror images* (each mirror a photo of the
same product): twice the data for the fit, the same one pass per backbone at query time.
``--hubness K:BETA,...`` adds, for every candidate, the same embedding ranked with a hubness
correction computed from the index alone (no query, no novel label): each product's score is
its cosine minus BETA x its *hubness*, the mean cosine between its prototype and the K enrolled
photos of *other* products nearest to it (CSLS's target-side term, with the gallery's photos
standing in for the queries it cannot know). It costs nothing per query beyond one subtraction
per product. Rule (fixed before any novel number was looked at): the candidate with
the highest mean seen-CV R@1 (to 3 decimals) is chosen, then the higher mean seen-CV R@3, then
the cheaper query (fewer backbone passes); a tie that remains goes to the candidate listed first
(a plain ranking before its hubness-corrected copies). ``chosen_whitened`` applies the same rule to the
whitened candidates only (the settings of benchmarks/search_grocery.py's ``trained`` row; added
after the first run, see docs/benchmarks.md). Only then are the novel and seen ``val/`` numbers computed, for
every candidate (so the table shows what the rule gave up), with the whitening fitted on all
seen products' ``train/`` photos as the product does.

The backbone passes are the slow part: per backbone, the last feature map of every photo's
centre crop (and of its mirror image) is pooled both ways (average, GeM) in one pass and the
pooled features cached under ``--cache`` by backbone and photo list, so the grid runs in numpy.

    nice -n 10 env TF_NUM_INTRAOP_THREADS=2 .venv/bin/python benchmarks/search_grocery_select.py \\
        --cache /work/cache/novel --out results/search_grocery_select.json
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.search_grocery import (GROCERY, PRODUCT_BASE, is_novel,  # noqa: E402
                                       read_classes, read_listing)

BACKBONE_SETS = {"lite2": ("efficientnet_lite2",),
                 "lite1+lite2": ("efficientnet_lite1", "efficientnet_lite2"),
                 "lite0+lite1+lite2": ("efficientnet_lite0", "efficientnet_lite1",
                                       "efficientnet_lite2")}
POOLINGS = {"avg": None, "gem3": 3.0}
SETTING_KEYS = ("backbones", "pooling", "flip", "whiten_dim", "whiten_reg", "whiten_mirrors",
                "hubness")
log = logging.getLogger("search_grocery_select")


def l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def pooled_features(backbone: str, paths: list[str], cache: Path, batch: int = 32) -> dict:
    """{"avg"|"gem3": {"plain"|"flip": (N, F) float32}} for the photos' centre crops (the
    Embedder's crop) and their mirror images, from one pass per view; cached on disk."""
    key = hashlib.sha256("\n".join(paths).encode()).hexdigest()[:16]
    f = cache / f"{backbone}-pooled-{key}.npz"
    if f.is_file():
        with np.load(f) as z:
            return {pool: {view: z[f"{pool}_{view}"] for view in ("plain", "flip")}
                    for pool in POOLINGS}
    import keras

    from shoplens.config import Settings
    from shoplens.vision import images
    from shoplens.vision.embedding import Embedder

    emb = Embedder(backbone, settings=Settings.from_env())
    fmap = keras.Model(emb.model.input, emb.model.layers[-1].input)
    crops = emb.centre_crops(emb.squares([images.decode(images.read_file(p), p) for p in paths]))
    out = {f"{pool}_{view}": [] for pool in POOLINGS for view in ("plain", "flip")}
    t0 = time.monotonic()
    for view in ("plain", "flip"):
        for i in range(0, len(crops), batch):
            x = crops[i:i + batch]
            x = x[:, :, ::-1] if view == "flip" else x
            m = np.asarray(fmap.predict_on_batch(x.astype(np.float32)), dtype=np.float32)
            out[f"avg_{view}"].append(m.mean(axis=(1, 2)))
            # GeM exactly as the Embedder's: (mean(max(x, 1e-6) ** p)) ** (1 / p).
            out[f"gem3_{view}"].append(
                np.power(np.power(np.maximum(m, 1e-6), 3.0).mean(axis=(1, 2)), 1 / 3.0))
        log.info("%s %s view: %d photos in %.0f s (load %s)", backbone, view, len(crops),
                 time.monotonic() - t0, os.getloadavg())
    arrays = {k: np.concatenate(v) for k, v in out.items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(f)
    return {pool: {view: arrays[f"{pool}_{view}"] for view in ("plain", "flip")}
            for pool in POOLINGS}


def embed_features(per_backbone: list[dict], pooling: str, flip: bool) -> np.ndarray:
    """What the Embedder's ``features`` returns: per backbone the pooled features (flip: the mean
    of the crop's and the mirror image's, each L2-normalised); several backbones: each
    L2-normalised, concatenated."""
    parts = []
    for feats in per_backbone:
        x = feats[pooling]["plain"]
        if flip:
            x = (l2(x) + l2(feats[pooling]["flip"])) / 2
        parts.append(x)
    return parts[0] if len(parts) == 1 else np.concatenate([l2(p) for p in parts], axis=1)


def unit_gram(per_backbone: list[dict], pooling: str, flip: bool, cache: dict) -> np.ndarray:
    """float64 (N, N): dot products of the photos' L2-normalised ``embed_features`` (what
    learned_whitening and the index see), assembled from per-backbone Gram matrices (cached in
    ``cache``): the concatenation of k unit parts has norm sqrt(k), so its Gram is their sum / k.
    Every fold then works in this N x N space, whatever the features' width."""
    total = None
    for feats in per_backbone:
        key = (id(feats), pooling, flip)
        if key not in cache:
            a = l2(feats[pooling]["plain"])
            g = (a @ a.T).astype(np.float64)
            if flip:
                b = l2(feats[pooling]["flip"])
                ab = (a @ b.T).astype(np.float64)
                g = (g + ab + ab.T + (b @ b.T).astype(np.float64)) / 4
                norms = np.sqrt(np.diag(g))
                g = g / np.outer(norms, norms)
            cache[key] = g
        total = cache[key] if total is None else total + cache[key]
    return total / len(per_backbone)


def mirrored_unit_gram(per_backbone: list[dict], pooling: str) -> np.ndarray:
    """float64 (2N, 2N): :func:`unit_gram` without flip averaging over the N photos followed by
    their N mirror images (rows N.. are the mirrors, in the same order)."""
    total = None
    for feats in per_backbone:
        both = l2(np.concatenate([feats[pooling]["plain"], feats[pooling]["flip"]]))
        g = (both @ both.T).astype(np.float64)
        total = g if total is None else total + g
    return total / len(per_backbone)


def fit_coordinates(gram: np.ndarray, fit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every photo's coordinates (N, r) in an orthonormal basis of the span of the fitting
    photos' centred unit features, and the fitting photos' own (len(fit), r): (x_i - m) . v_k
    from the Gram matrix alone (m: the fitting photos' mean)."""
    to_fit = gram[:, fit]
    fit_fit = to_fit[fit]
    col_mean = fit_fit.mean(0)
    centred = to_fit - to_fit.mean(1, keepdims=True) - col_mean[None, :] + col_mean.mean()
    evals, evecs = np.linalg.eigh(centred[fit])
    keep = evals > evals[-1] * 1e-6  # the span's dimensions (the rest is round-off)
    basis = evecs[:, keep] / np.sqrt(evals[keep])
    coords = (centred @ basis).astype(np.float32)
    return coords, coords[fit].astype(np.float64)


def whitening_basis(fit_coords: np.ndarray, labels: np.ndarray, width: int):
    """The learned whitening's pieces that do not depend on its regularisation or width, in the
    fitting photos' span (:func:`fit_coordinates`). This gives exactly
    shoplens.vision.embedding.learned_whitening's embeddings: the within-product covariance is
    zero outside that span, so every kept axis lies inside it. ``width``: the features' F (the
    regularisation is relative to the mean of all F eigenvalues). Returns (within eigenvalues,
    eigenvectors, the fitting photos' coordinates, F)."""
    classes, pos = np.unique(labels, return_inverse=True)
    class_means = np.zeros((len(classes), fit_coords.shape[1]))
    np.add.at(class_means, pos, fit_coords)
    class_means /= np.bincount(pos)[:, None]
    within = fit_coords - class_means[pos]
    evals, evecs = np.linalg.eigh(within.T @ within / len(fit_coords))
    return np.maximum(evals, 0), evecs, fit_coords, width


def whitening_projections(parts, regs, dims) -> dict:
    """{(reg, dim): (r, dim) projection} of the coordinates in the basis, per learned_whitening."""
    evals, evecs, coords, width = parts
    # The mean eigenvalue over all F dimensions (the ones outside the span are zero).
    mean_eval = max(evals.sum() / width, 1e-12)
    out = {}
    for reg in regs:
        whiten = evecs / np.sqrt(evals + reg * mean_eval)
        z = coords @ whiten
        evals2, evecs2 = np.linalg.eigh(z.T @ z / len(z))
        order = np.argsort(-evals2)
        for dim in dims:
            out[(reg, dim)] = whiten @ evecs2[:, order[:dim]]
    return out


def hubness(protos: np.ndarray, enrol: np.ndarray, enrol_pos: np.ndarray, k: int) -> np.ndarray:
    """(P,) each product's hubness: the mean cosine between its unit prototype and the ``k``
    enrolled unit photos of other products nearest to it (``enrol_pos``: each photo's product
    row). A product whose prototype sits close to many other products' photos wins queries it
    should not; CSLS subtracts this term."""
    sims = protos @ enrol.T
    sims[enrol_pos, np.arange(len(enrol))] = -np.inf  # a product's own photos do not count
    k = min(k, sims.shape[1] - 1)
    return np.partition(sims, -k, axis=1)[:, -k:].mean(1)


def recalls(q: np.ndarray, q_labels: np.ndarray, enrol: np.ndarray, enrol_labels: np.ndarray,
            hub: tuple[int, float] | None = None) -> tuple[float, float, np.ndarray]:
    """Prototype ranking (the normalised mean of each product's unit embeddings), as the index
    does: R@1, R@3 and the per-query rank hits (for the spread). ``hub`` (K, BETA): scores
    less BETA x :func:`hubness` with K neighbours."""
    products, pos = np.unique(enrol_labels, return_inverse=True)
    members = np.zeros((len(products), len(enrol)), np.float32)
    members[pos, np.arange(len(enrol))] = 1
    photos = l2(enrol)
    protos = l2(members @ photos)
    scores = l2(q) @ protos.T
    if hub is not None:
        scores = scores - hub[1] * hubness(protos, photos, pos, hub[0])[None, :]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    truth = np.searchsorted(products, q_labels)
    hit1 = top[:, 0] == truth
    hit3 = (top == truth[:, None]).any(1)
    return float(hit1.mean()), float(hit3.mean()), hit1


def candidates(backbone_sets, dims, regs, mirrors: bool = False,
               hubs: tuple[tuple[int, float], ...] = ()) -> list[dict]:
    out = []
    for bset, pooling, flip in itertools.product(backbone_sets, POOLINGS, (False, True)):
        out.append({"backbones": bset, "pooling": pooling, "flip": flip, "whiten_dim": 0,
                    "whiten_reg": None})
        for dim, reg in itertools.product(dims, regs):
            out.append({"backbones": bset, "pooling": pooling, "flip": flip, "whiten_dim": dim,
                        "whiten_reg": reg})
            if mirrors and not flip:
                out.append({"backbones": bset, "pooling": pooling, "flip": False,
                            "whiten_dim": dim, "whiten_reg": reg, "whiten_mirrors": True})
    out = [dict(c, **extra) for c in out
           for extra in [{}] + [{"hubness": [k, beta]} for k, beta in hubs]]
    for c in out:
        c["backbone_passes"] = len(BACKBONE_SETS[c["backbones"]]) * (2 if c["flip"] else 1)
    return out


def parse_hubs(text: str) -> tuple[tuple[int, float], ...]:
    """"10:0.5,10:1" -> ((10, 0.5), (10, 1.0))."""
    out = []
    for item in filter(None, text.split(",")):
        k, beta = item.split(":")
        out.append((int(k), float(beta)))
    return tuple(out)


def cv_splits(seen: list[int], splits: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """Both ways of ``splits`` random halvings of the seen products: (fit on, query) pairs."""
    rng = np.random.default_rng(seed)
    folds = []
    for _ in range(splits):
        perm = rng.permutation(seen).tolist()
        a, b = sorted(perm[:len(perm) // 2]), sorted(perm[len(perm) // 2:])
        folds += [(a, b), (b, a)]
    return folds


def choose(rows: list[dict]) -> dict:
    """The rule, fixed before any novel number was looked at: highest mean seen-CV R@1 (to 3
    decimals), then highest mean seen-CV R@3, then fewest backbone passes per query."""
    return max(rows, key=lambda r: (round(r["cv"]["R@1"], 3), round(r["cv"]["R@3"], 3),
                                    -r["backbone_passes"]))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grocery", type=Path, default=GROCERY)
    ap.add_argument("--cache", type=Path, default=REPO / ".run" / "search_grocery_select")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "search_grocery_select.json")
    ap.add_argument("--splits", type=int, default=10)
    ap.add_argument("--seed", type=int, default=16)
    ap.add_argument("--backbone-sets", nargs="+", default=list(BACKBONE_SETS),
                    choices=list(BACKBONE_SETS))
    ap.add_argument("--dims", type=int, nargs="+", default=[256, 512],
                    help="learned whitening widths (0, no whitening, is always a candidate)")
    ap.add_argument("--regs", type=float, nargs="+", default=[0.2, 0.5, 1.0])
    ap.add_argument("--whiten-mirrors", action="store_true",
                    help="also the whitening fitted with the fitting photos' mirror images")
    ap.add_argument("--hubness", type=parse_hubs, default=(), metavar="K:BETA,...",
                    help="also every candidate ranked with the hubness correction (K gallery "
                         "neighbours, weight BETA)")
    ap.add_argument("--print-top", type=int, default=15)
    ap.add_argument("--merge", nargs="+", type=Path, metavar="RESULTS",
                    help="apply the rule to the candidates of earlier runs (e.g. one per "
                         "backbone set, run side by side) instead of computing anything")
    ap.add_argument("--features-only", action="store_true",
                    help="only compute (cache) the backbone features")
    args = ap.parse_args(argv)
    if not (args.grocery / "classes.csv").is_file():
        print(f"skipped: needs {args.grocery} (absent on this machine)")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.merge:
        return merge(args.merge, args.out, args.print_top)
    load_start = os.getloadavg()
    t0 = time.monotonic()
    classes = read_classes(args.grocery)
    train = read_listing(args.grocery, args.grocery / "train.txt")
    queries = read_listing(args.grocery, args.grocery / "val.txt")
    iconic = [(c["iconic"], c["label"]) for c in classes if c["iconic"]]
    photos = train + iconic + queries
    paths = [p for p, _ in photos]
    needed = sorted({b for s in args.backbone_sets for b in BACKBONE_SETS[s]},
                    key=lambda b: b != "efficientnet_lite2")  # the single-backbone set first
    t_feat = time.monotonic()
    feats = {b: pooled_features(b, paths, args.cache) for b in needed}
    t_feat = time.monotonic() - t_feat
    if args.features_only:
        return 0
    n_train, n_iconic = len(train), len(iconic)
    labels = np.array([lab for _, lab in photos])
    enrol = np.arange(n_train + n_iconic)          # every product's train/ photos + catalogue image
    query = np.arange(n_train + n_iconic, len(photos))
    is_train = np.arange(len(photos)) < n_train
    seen = sorted({lab for _, lab in train if not is_novel(lab)})
    folds = cv_splits(seen, args.splits, args.seed)
    regs, dims = args.regs, args.dims
    rows = candidates(args.backbone_sets, dims, regs, args.whiten_mirrors, args.hubness)
    by_features: dict = {}
    for c in rows:
        by_features.setdefault((c["backbones"], c["pooling"], c["flip"],
                                c.get("whiten_mirrors", False)), []).append(c)
    t_grid = time.monotonic()
    grams: dict = {}
    top_dim = max(dims)

    n_photos = len(photos)

    def embeddings(gram, fit, width, mirrors=False):
        """{candidate key: (N, dim) embeddings} for the whitening fitted on the ``fit`` photos
        (``mirrors``: ``gram`` is :func:`mirrored_unit_gram`'s and the fit takes the photos'
        mirror images too; the embeddings are the photos' own)."""
        fit_rows = np.concatenate([fit, fit + n_photos]) if mirrors else fit
        coords, fit_coords = fit_coordinates(gram, fit_rows)
        proj = whitening_projections(whitening_basis(fit_coords, labels[fit_rows % n_photos],
                                                     width), regs, [top_dim])
        out = {}
        for reg in regs:
            full = coords[:n_photos] @ proj[(reg, top_dim)].astype(np.float32)
            for dim in dims:  # the kept axes are ordered: a narrower whitening is a prefix
                out[(reg, dim)] = full[:, :dim]
        return out

    for (bset, pooling, flip, mirrors), group in by_features.items():
        per_backbone = [feats[b] for b in BACKBONE_SETS[bset]]
        width = sum(f[pooling]["plain"].shape[1] for f in per_backbone)
        gram = (mirrored_unit_gram(per_backbone, pooling) if mirrors
                else unit_gram(per_backbone, pooling, flip, grams))
        raw = l2(embed_features(per_backbone, pooling, flip)) if 0 in [c["whiten_dim"] for c in group] \
            else None
        fold_scores = {id(c): [] for c in group}
        for fit_on, ask in folds:
            fit = np.flatnonzero(is_train & np.isin(labels, fit_on))
            asked = query[np.isin(labels[query], ask)]
            emb = embeddings(gram, fit, width, mirrors)
            for c in group:
                e = raw if not c["whiten_dim"] else emb[(c["whiten_reg"], c["whiten_dim"])]
                r1, r3, _ = recalls(e[asked], labels[asked], e[enrol], labels[enrol],
                                    c.get("hubness"))
                fold_scores[id(c)].append((r1, r3))
        # The product's fit: the whitening on all seen products' train/ photos; every query.
        emb = embeddings(gram, np.flatnonzero(is_train & np.isin(labels, seen)), width, mirrors)
        novel_q = query[[is_novel(lab) for lab in labels[query]]]
        seen_q = query[[not is_novel(lab) for lab in labels[query]]]
        for c in group:
            s = np.array(fold_scores[id(c)])
            c["cv"] = {"R@1": round(float(s[:, 0].mean()), 4), "R@3": round(float(s[:, 1].mean()), 4),
                       "R@1_sd": round(float(s[:, 0].std()), 4),
                       "R@3_sd": round(float(s[:, 1].std()), 4), "folds": len(s)}
            e = raw if not c["whiten_dim"] else emb[(c["whiten_reg"], c["whiten_dim"])]
            for name, asked in (("novel", novel_q), ("seen", seen_q)):
                r1, r3, _ = recalls(e[asked], labels[asked], e[enrol], labels[enrol],
                                    c.get("hubness"))
                c[name] = {"R@1": round(r1, 4), "R@3": round(r3, 4), "n": len(asked)}
        log.info("%s %s flip=%s mirrors=%s: best CV R@1 %.3f (%.0f s)", bset, pooling, flip,
                 mirrors, max(c["cv"]["R@1"] for c in group), time.monotonic() - t_grid)
    chosen = choose(rows)
    result = {"benchmark": "search_grocery_select",
              "protocol": {"seen_products": len(seen), "splits": args.splits, "seed": args.seed,
                           "folds": len(folds), "queries": len(query), "enrolled": len(enrol),
                           "rule": choose.__doc__.split("The rule, ")[1].strip()},
              "chosen": chosen, "candidates": rows,
              "seconds": {"backbone_features": round(t_feat, 1),
                          "grid": round(time.monotonic() - t_grid, 1)},
              "wall_s": round(time.monotonic() - t0, 1),
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    report(result, args.out, args.print_top)
    return 0


def merge(paths: list[Path], out: Path, print_top: int) -> int:
    runs = [json.loads(p.read_text()) for p in paths]
    protocols = {json.dumps({k: v for k, v in r["protocol"].items()}, sort_keys=True)
                 for r in runs}
    if len(protocols) != 1:
        raise SystemExit("error: the runs differ in protocol (splits, seed, rule)")
    rows = [c for r in runs for c in r["candidates"]]
    result = {"benchmark": "search_grocery_select", "protocol": runs[0]["protocol"],
              "chosen": choose(rows), "candidates": rows, "merged_from": [str(p) for p in paths],
              "runs": [{k: r[k] for k in ("seconds", "wall_s", "load_average_at_start",
                                          "load_average_at_end")} for r in runs]}
    report(result, out, print_top)
    return 0


def report(result: dict, out: Path, print_top: int) -> None:
    rows, chosen = result["candidates"], result["chosen"]
    # The same rule among the whitened candidates only: the settings of the benchmark's
    # "trained" row (its "baseline" row is the unwhitened embedding).
    result["chosen_whitened"] = choose([r for r in rows if r["whiten_dim"]])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for c in sorted(rows, key=lambda r: -r["cv"]["R@1"])[:print_top]:
        print(f"{c['backbones']:18s} {c['pooling']:4s} flip={c['flip']!s:5s} "
              f"{'M' if c.get('whiten_mirrors') else ' '}W{c['whiten_dim']:<3d} reg {c['whiten_reg']!s:4s} "
              f"hub {c.get('hubness') or '-'!s:9s} CV R@1 {c['cv']['R@1']:.3f}"
              f"±{c['cv']['R@1_sd']:.3f} R@3 {c['cv']['R@3']:.3f}   novel {c['novel']['R@1']:.3f}"
              f" / {c['novel']['R@3']:.3f}   seen {c['seen']['R@1']:.3f} / {c['seen']['R@3']:.3f}")
    print(f"chosen: {json.dumps({k: chosen.get(k) for k in SETTING_KEYS})}"
          f" -> novel {chosen['novel']}  seen {chosen['seen']}; results in {out}")
    w = result["chosen_whitened"]
    print(f"chosen among whitened: {json.dumps({k: w.get(k) for k in SETTING_KEYS})}"
          f" -> novel {w['novel']}  seen {w['seen']}")


if __name__ == "__main__":
    sys.exit(main())

"""The catalogue's search index, versioned in the object store and refreshed incrementally: the
stage entry :func:`refresh` (the nightly DAG's ``refresh_search_index``, ``shoplens index
refresh``), plus finding and downloading the current index for ``search`` and ``serve``.

What is enrolled: every product with at least one kept review photo (``kept_images``: the
filter's keep verdict, near-duplicates removed) or a catalogue image (``catalogue_images``);
each photo is one vector, tagged with its product. Sources: a kept photo is its sha256, a
catalogue image ``catalogue/<product_id>/<sha256>``.

Incremental: the parent (``current_search_index``) is reused when it was built with the same
embedding (model id, backbone, input size, weights); only sources not in it are read from the
object store, decoded by the one decoder and embedded (a source whose bytes are already in the
index under another name reuses that vector). Sources that left (a photo rejected later, a
changed catalogue image) are dropped by copying the parent's other vectors into a new index:
still nothing is embedded again. A new embedding model, or ``full=True``, builds from scratch.

Threshold ("no confident match"): recalibrated on every refresh, by leave-one-out over a
deterministic sample (at most ``search_calibration_queries``, chosen by a seeded hash of the
source names, so an incremental refresh and a full rebuild of one catalogue use the same
queries and choose the same threshold) of the enrolled review photos of products that have
another photo: each is a query against the index with itself removed (its product's prototype
recomputed without it, and without the ``search_calibration_holdout`` fraction of its product's photos most like it:
near-duplicates from one session make a plain leave-one-out far too easy), the answer is right
when its own product ranks first, and the lowest confidence under the
rule ``search_confidence_rule`` (top1, margin or combined: ``modeling.search_index``) that keeps
the target precision on those queries is the cut, saved with the index. The manifest's
``threshold`` column holds the top-1 cut, calibrated on the same queries whatever the rule.
Why: the threshold depends on the gallery (more products, closer impostors) as much as on the
embedding, so a threshold chosen once drifts as the catalogue grows; leave-one-out review photos
are the closest labelled stand-in for a customer's photo the manifest holds, and it reuses stored
vectors (no photo embedded for it). With fewer than ``MIN_CALIBRATION_QUERIES`` such queries the
parent's threshold is kept (none on a first build: answers are then never marked confident).
A refresh that neither adds nor removes a vector keeps its parent's threshold without running
the calibration when the settings it used (``_calibration_inputs``, saved with the threshold)
are unchanged: it would choose the same one.

Retention (:func:`prune`, run after each refresh and by ``shoplens index prune``): the newest
``search_keep_versions`` complete versions are kept; the others become 'pruned' rows whose
objects, and the chunks no kept version lists, are deleted.

Storage, under ``search-indexes/`` in the bucket::

    search-indexes/<index_id>/index.json, products.json, embedding/..., ann-<n>.faiss (IVF only)
    search-indexes/chunks/<sha256>.npz    vector chunks, content-addressed and shared by versions

so a version is its parent's chunks plus a delta: a refresh uploads only its new chunk, the
product table and index.json (an exact ANN is rebuilt from the chunks when loaded; a trained
IVF one, above ``EXACT_BELOW`` vectors, is still stored whole). The ``search_indexes``
row is inserted as 'building' first and set 'complete' only after every object is uploaded
(index.json last); any exception sets it 'failed' with the error, and the current index (the
newest complete row) is never modified. Readers download a version into a local cache folder
keyed by its id, assembled in a temporary folder and renamed into place (chunks already cached
for another version are hard-linked, not downloaded again). A refresh builds in a dot folder of
that cache and renames it into place once uploaded, so the next night's parent is local.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from shoplens.config import Settings
from shoplens.manifest import engine_for, require_migrated, session_scope
from shoplens.checksums import file_sha256
# In the local index cache: the embedding network frozen once, so that a night with a few new
# photos loads it instead of building and tracing Keras again.
from shoplens.vision.embedding import NETWORK_CACHE
from shoplens.manifest.schema import (catalogue_images, categories, current_search_index,
                                      products, search_indexes)

log = logging.getLogger(__name__)

INDEX_PREFIX = "search-indexes"
CHUNK_PREFIX = f"{INDEX_PREFIX}/chunks/"
CATALOGUE_SOURCE = "catalogue"
MIN_CALIBRATION_QUERIES = 10


class IndexNotFound(LookupError):
    """No such search index (or no current one) in the manifest or the object store."""


# --------------------------------------------------------------------------------------------
# The stage entry
# --------------------------------------------------------------------------------------------
def refresh(settings: Settings, run_key: str | None = None, full: bool = False) -> dict:
    """Build the next search index version (incrementally from the current one when it was
    made with the current embedding) and make it current. Returns its summary:
    ``{index_id, parent_id, model_id, mode, products, vectors, added_vectors, embedded,
    removed_vectors, unreadable, threshold, calibration_queries, seconds, timings}``, where
    ``timings`` splits ``seconds`` by phase (``_Phases``: what a refresh's fixed cost is)."""
    from modeling.search_index import SearchIndex

    started = time.monotonic()
    phases = _Phases()
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        require_migrated(conn)
        parent = conn.execute(sa.select(current_search_index)).mappings().first()
    cache = cache_dir(settings)
    with phases("embedder"):
        embedder, model_id = _embedder(settings, cache)
    identity = embedding_identity(embedder, model_id)
    incremental = parent is not None and not full and _same_embedding(parent, identity)
    index_id = new_index_id()
    prefix = f"{INDEX_PREFIX}/{index_id}/"
    with session_scope(settings.manifest_url) as conn:
        conn.execute(search_indexes.insert().values(
            id=index_id, parent_id=parent["id"] if incremental else None, model_id=model_id,
            embedding=identity, status="building", artifact_prefix=prefix, run_key=run_key))
    log.info("search index %s: %s build%s", index_id, "incremental" if incremental else "full",
             f" on {parent['id']}" if incremental else "")
    # Built inside the cache (a dot folder: not a version), so that once uploaded it becomes the
    # cached copy of this version by a rename: the next night's parent is then read locally.
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=cache, prefix=f".build-{index_id}-"))
    try:
        with phases("manifest"):
            wanted, details = _enrolment(settings)
        if incremental:
            with phases("parent"):
                parent_dir = download(settings, parent["id"], cache)
                shutil.copytree(parent_dir, work / "index", copy_function=_link_or_copy)
                index = SearchIndex.load(work / "index", settings)  # its own embedder: the same
                index.embedder.cache_network(cache / NETWORK_CACHE)
                index.aggregation = settings.search_aggregation  # a setting, not a rebuild
        else:
            with phases("backbone"):  # the index's dimension is the backbone's output
                embedder.cache_network(cache / NETWORK_CACHE).prepare_network()
            index = SearchIndex(embedder, settings.search_aggregation)
        stale = [s for s in index.sources() if s not in wanted]
        if stale:
            index = index.without_sources(set(stale))
        previous_threshold = index.threshold
        index.products = {}
        index.add_products([details[pid] for pid in sorted({pid for pid, _, _ in wanted.values()})])
        base = len(index)
        embedded, reused, unreadable = _add_new_sources(settings, index, wanted, phases)
        inputs = _calibration_inputs(settings)
        if (incremental and not stale and len(index) == base and previous_threshold
                and previous_threshold.get("inputs") == inputs):
            # The same vectors, sources and settings as the parent's calibration: it would
            # choose the same rule again (it is deterministic), so it is not run.
            calibration = previous_threshold
            log.info("search index %s: nothing changed since %s: its threshold kept",
                     index_id, parent["id"])
        else:
            with phases("calibration"):
                calibration = index.calibrate_leave_one_out(
                    settings.search_target_precision, settings.search_calibration_queries,
                    seed=settings.model_seed, rule=settings.search_confidence_rule,
                    holdout=settings.search_calibration_holdout)
            calibration["inputs"] = inputs
        if calibration["queries"] >= MIN_CALIBRATION_QUERIES:
            index.threshold = calibration
        else:
            log.warning("search index %s: %d calibration queries (< %d): threshold %s kept",
                        index_id, calibration["queries"], MIN_CALIBRATION_QUERIES,
                        previous_threshold and round(previous_threshold["threshold"], 4))
            index.threshold = previous_threshold
        with phases("save"):  # the vectors' new chunk, the product table, the ANN
            index.save(work / "index")
        with phases("upload"):
            uploaded = upload(settings, work / "index", prefix)
        stats = {"index_id": index_id, "parent_id": parent["id"] if incremental else None,
                 "model_id": model_id, "mode": "incremental" if incremental else "full",
                 "products": index.product_count(), "vectors": len(index),
                 "added_vectors": len(index) - base,
                 "embedded": embedded, "reused_vectors": reused, "removed_vectors": len(stale),
                 "unreadable": unreadable,
                 "threshold": index.threshold and index.threshold["threshold"],
                 "confidence_rule": index.threshold and index.threshold.get("rule", "top1"),
                 "calibration_queries": calibration["queries"]}
        with session_scope(settings.manifest_url) as conn:
            conn.execute(search_indexes.update().where(search_indexes.c.id == index_id).values(
                status="complete", products=stats["products"], vectors=stats["vectors"],
                added_vectors=stats["added_vectors"], threshold=stats["threshold"],
                completed_at=sa.func.now()))
        with phases("save"):
            _keep_as_cached(work / "index", uploaded, cache / index_id)
        with phases("prune"):
            stats["pruned"] = _prune_quietly(settings)
        stats["seconds"] = round(time.monotonic() - started, 3)
        stats["timings"] = phases.summary(stats["seconds"])
        log.info("search index %s complete: %s", index_id, stats)
        return stats
    except BaseException as exc:
        _fail(settings, index_id, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


# Bumped when the leave-one-out calibration's code changes what it chooses: a threshold made
# by other code is not carried over to a version with the same vectors.
CALIBRATION_VERSION = 1


def _calibration_inputs(settings: Settings) -> dict:
    """What besides the index's vectors and sources decides its calibrated threshold."""
    return {"version": CALIBRATION_VERSION, "aggregation": settings.search_aggregation,
            "target_precision": settings.search_target_precision,
            "max_queries": settings.search_calibration_queries, "seed": settings.model_seed,
            "rule": settings.search_confidence_rule,
            "holdout": settings.search_calibration_holdout}


class _Phases:
    """Wall seconds per phase of a refresh: ``embedder`` (finding the model; the backbone is
    built lazily), ``manifest`` (enrolment queries), ``parent`` (download and load of the parent
    index), ``backbone`` (building the network with its weights, only when something is
    embedded), ``embed`` (reading, decoding and embedding the new photos; the first batch
    includes tracing the network), ``calibration``, ``save`` (the new chunk, product table and
    ANN), ``upload``; ``other`` is the rest (manifest rows, copies)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timer():
            t0 = time.monotonic()
            try:
                yield
            finally:
                self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - t0
        return timer()

    def summary(self, total: float) -> dict:
        out = {k: round(v, 3) for k, v in self.seconds.items()}
        out["other"] = round(max(0.0, total - sum(self.seconds.values())), 3)
        return out


def new_index_id() -> str:
    """Sortable by creation time, unique: si-20261204T101500Z-1a2b3c."""
    return f"si-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:6]}"


def _fail(settings: Settings, index_id: str, error: str) -> None:
    try:
        with session_scope(settings.manifest_url) as conn:
            conn.execute(search_indexes.update().where(search_indexes.c.id == index_id).values(
                status="failed", error=error[:4000], completed_at=sa.func.now()))
    except Exception as exc:  # noqa: BLE001 - the original failure is what the caller must see
        log.error("could not mark search index %s failed: %s", index_id, exc)


def embedding_identity(embedder, model_id: str | None) -> dict:
    """What makes two embedders give the same vectors (read without building the backbone)."""
    weights = (embedder.settings or Settings()).model_init
    return {"model_id": model_id, "backbone": embedder.backbone,
            "image_size": int(embedder.image_size), "weights": weights,
            "trained": embedder.trained, "tuned_blocks": int(embedder.tuned_blocks)}


def _same_embedding(parent, identity: dict) -> bool:
    recorded = dict(parent["embedding"] or {})
    return parent["model_id"] == identity["model_id"] and all(
        recorded.get(k) == identity[k] for k in identity if k != "model_id")


def _embedder(settings: Settings, cache: Path):
    """(Embedder, model id): the promoted embedding model, or the untrained baseline (model id
    None) on the embedding's backbone at ``search_image_size`` (0: ``model_image_size``)."""
    from shoplens.vision.current import baseline_embedder, load_current_embedding

    current = load_current_embedding(settings, cache / "embeddings")
    if current is not None:
        model_id, embedder = current
        return embedder, model_id
    return baseline_embedder(settings), None


# --------------------------------------------------------------------------------------------
# What is enrolled
# --------------------------------------------------------------------------------------------
def catalogue_source(product_id: int, sha256: str) -> str:
    return f"{CATALOGUE_SOURCE}/{int(product_id)}/{sha256}"


def source_sha(source: str) -> str:
    return source.rsplit("/", 1)[-1]


def _enrolment(settings: Settings) -> tuple[dict, dict]:
    """({source: (product_id, sha256, object_key)}, {product_id: product details}) for every
    kept photo and catalogue image in the manifest."""
    with engine_for(settings.manifest_url).connect() as conn:
        kept_rows = conn.execute(sa.text(
            "SELECT sha256, product_id, object_key FROM kept_images ORDER BY sha256")).all()
        cat_rows = conn.execute(sa.select(catalogue_images.c.product_id, catalogue_images.c.sha256,
                                          catalogue_images.c.object_key)
                                .order_by(catalogue_images.c.product_id)).all()
        wanted: dict[str, tuple[int, str, str]] = {}
        for r in kept_rows:
            wanted[r.sha256] = (int(r.product_id), r.sha256, r.object_key)
        thumbs = {}
        for r in cat_rows:
            wanted[catalogue_source(r.product_id, r.sha256)] = (int(r.product_id), r.sha256,
                                                                r.object_key)
            thumbs[int(r.product_id)] = r.object_key
        ids = sorted({pid for pid, _, _ in wanted.values()})
        p = products.c
        rows = conn.execute(sa.select(p.id, p.name, p.brand, p.price, p.source_url,
                                      p.category_id, categories.c.name.label("category_name"))
                            .select_from(products.outerjoin(categories,
                                                            categories.c.id == p.category_id))
                            .where(p.id.in_(ids))).all() if ids else []
    details = {}
    for r in rows:
        # The shop's category (id and name): identify maps it to a detector class
        # (identify_category_classes) so a detected chair is matched among chairs.
        entry = {"product_id": int(r.id), "name": r.name, "url": r.source_url,
                 "category": r.category_id}
        if r.category_name:
            entry["category_name"] = r.category_name
        if r.price is not None:
            entry["price"] = int(r.price)
        if r.brand:
            entry["brand"] = r.brand
        if int(r.id) in thumbs:
            entry["thumbnail_key"] = thumbs[int(r.id)]
        details[int(r.id)] = entry
    return wanted, details


def _add_new_sources(settings: Settings, index, wanted: dict,
                     phases: _Phases | None = None) -> tuple[int, int, int]:
    """Embed the sources not in ``index`` (each distinct photo once; bytes already in the index
    under another source reuse its vector). Returns (embedded, reused, unreadable)."""
    phases = phases or _Phases()
    from shoplens.photos import PhotoLimits
    from shoplens.progress import progress
    from shoplens.store import ObjectStore
    from shoplens.vision import images

    todo = [s for s in sorted(wanted) if not index.has_source(s)]
    if not todo:
        return 0, 0, 0
    by_sha: dict[str, list[str]] = {}
    for s in todo:
        by_sha.setdefault(wanted[s][1], []).append(s)
    known = index.vectors_by_sha(source_sha, by_sha)
    reused = 0
    reuse = [sha for sha in by_sha if sha in known]
    if reuse:
        sources = [s for sha in reuse for s in by_sha[sha]]
        vecs = np.stack([known[wanted[s][1]] for s in sources])
        reused = index.add_vectors(vecs, [wanted[s][0] for s in sources], sources)
    fresh = [sha for sha in by_sha if sha not in known]
    if not fresh:
        return 0, reused, 0
    with phases("backbone"):  # built or loaded here, so that its cost is told apart
        index.embedder.prepare_network()
    store, limits = ObjectStore(settings), PhotoLimits.from_settings(settings)
    key_of = {sha: wanted[by_sha[sha][0]][2] for sha in fresh}
    embedded = unreadable = 0
    batch_size = max(1, settings.search_embed_batch)

    def flush(part):
        nonlocal embedded
        if not part:
            return
        vecs = index.embedder.embed_decoded([img for _, img in part], fixed_batch=True)
        rows = [(i, s) for i, (sha, _) in enumerate(part) for s in by_sha[sha]]
        embedded += len(part)
        index.add_vectors(vecs[[i for i, _ in rows]], [wanted[s][0] for _, s in rows],
                          [s for _, s in rows])

    with phases("embed"), progress(total=len(fresh), desc="search index: embedding",
                                   unit="photos") as bar:
        part: list = []
        for sha, data, error in store.read_objects(fresh, key=key_of.__getitem__):
            if error is not None:
                raise error  # the store failing is the night failing, not one bad photo
            try:
                part.append((sha, images.decode(data, key_of[sha], limits)))
            except images.UnreadableImage as exc:
                unreadable += 1
                log.warning("search index: %s skipped: %s", sha, exc)
            if len(part) >= batch_size:
                flush(part)
                bar.advance(len(part))
                part = []
        flush(part)
        bar.advance(len(part))
    return embedded, reused, unreadable


# --------------------------------------------------------------------------------------------
# The object store
# --------------------------------------------------------------------------------------------
def upload(settings: Settings, local_dir: Path, prefix: str) -> dict:
    """Chunks to their content address (skipped when already stored), then the version's own
    files, index.json last (with the chunk names it lists). Returns that index.json.

    A chunk whose file is already named by its content address came with the parent version
    (complete, so the chunk is stored): it is neither hashed nor looked up again, and a night
    that adds one chunk uploads that chunk, the product table and index.json (the exact ANN is
    not stored: ``SearchIndex.save``)."""
    from modeling.search_index import CHUNK_DIR, INDEX_FILE
    from shoplens.store import ObjectStore

    store = ObjectStore(settings)
    store.ensure_bucket()
    config = json.loads((local_dir / INDEX_FILE).read_text())
    names = []
    for name in config["chunks"]:
        if _is_content_address(name):
            names.append(name)
            continue
        path = local_dir / CHUNK_DIR / name
        digest = file_sha256(path)
        stored = f"{digest}.npz"
        if not store.exists(CHUNK_PREFIX + stored):
            store.put_bytes(CHUNK_PREFIX + stored, path.read_bytes())
        names.append(stored)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        if rel.startswith(f"{CHUNK_DIR}/") or rel == INDEX_FILE or path.name.startswith("."):
            continue
        ctype = "application/json" if path.suffix == ".json" else "application/octet-stream"
        store.put_bytes(prefix + rel, path.read_bytes(), ctype)
    config["chunks"] = names
    store.put_bytes(prefix + INDEX_FILE, json.dumps(config, indent=1, ensure_ascii=False).encode(),
                    "application/json")
    return config


def _is_content_address(chunk_name: str) -> bool:
    stem = chunk_name.removesuffix(".npz")
    return chunk_name.endswith(".npz") and len(stem) == 64 and \
        all(c in "0123456789abcdef" for c in stem)


def _keep_as_cached(local_dir: Path, uploaded: dict, target: Path) -> None:
    """Turn the just-uploaded build folder into the cache's copy of its version (what
    ``download`` would assemble): chunks renamed to their content addresses, index.json as
    uploaded. Same filesystem (built under the cache): renames only, nothing copied."""
    from modeling.search_index import CHUNK_DIR, INDEX_FILE

    try:
        local = json.loads((local_dir / INDEX_FILE).read_text())["chunks"]
        for name, stored in zip(local, uploaded["chunks"]):
            if name != stored:
                os.replace(local_dir / CHUNK_DIR / name, local_dir / CHUNK_DIR / stored)
        (local_dir / INDEX_FILE).write_text(json.dumps(uploaded, indent=1, ensure_ascii=False))
        if not (target / INDEX_FILE).is_file():
            os.replace(local_dir, target)
    except OSError as exc:  # only a cache: the next reader downloads the version instead
        log.warning("search index: could not keep %s in the cache: %s", target.name, exc)


def download(settings: Settings, index_id: str, cache: Path) -> Path:
    """The index's local directory under ``cache`` (downloaded once, assembled atomically)."""
    from modeling.search_index import CHUNK_DIR, INDEX_FILE

    target = cache / index_id
    if (target / INDEX_FILE).is_file():
        return target
    from shoplens.store import ObjectStore

    store = ObjectStore(settings)
    prefix = f"{INDEX_PREFIX}/{index_id}/"
    keys = list(store.list_keys(prefix))
    if prefix + INDEX_FILE not in keys:
        raise IndexNotFound(f"search index {index_id!r} has no complete artefacts under {prefix}")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{index_id}-"))
    try:
        for key in keys:
            dest = tmp / key[len(prefix):]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(store.get_bytes(key))
        (tmp / CHUNK_DIR).mkdir(exist_ok=True)
        for name in json.loads((tmp / INDEX_FILE).read_text())["chunks"]:
            dest = tmp / CHUNK_DIR / name
            cached = next((p for p in cache.glob(f"*/{CHUNK_DIR}/{name}")
                           if not p.parts[-3].startswith(".")), None)
            if cached is not None:
                _link_or_copy(cached, dest)
            else:
                dest.write_bytes(store.get_bytes(CHUNK_PREFIX + name))
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _link_or_copy(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


# --------------------------------------------------------------------------------------------
# Retention: old versions pruned
# --------------------------------------------------------------------------------------------
def prune(settings: Settings, keep: int | None = None) -> dict:
    """Keep the newest ``keep`` complete versions (default ``search_keep_versions``; the current
    one is the newest, so it is always kept) and delete the other versions' objects: their own
    files, then every chunk no kept version lists. Returns ``{kept, pruned, removed_objects,
    removed_chunks, chunks_skipped, removed_network_files}``; the local cache loses the pruned
    versions and the frozen networks not loaded for two weeks (``prune_frozen_networks``).

    Safe against readers and a concurrent refresh: a pruned row is marked 'pruned' before its
    objects go (nobody resolves it any more: ``current_search_index`` is the newest complete
    one), a refresh's parent is the current version (kept, so its chunks are kept), and chunks
    are left alone while any build is in progress (it may be reusing one). Idempotent: a crash
    halfway leaves rows already 'pruned', whose remaining objects the next prune deletes."""
    from modeling.search_index import INDEX_FILE
    from shoplens.store import ObjectStore
    from shoplens.vision.embedding import prune_frozen_networks

    keep = settings.search_keep_versions if keep is None else keep
    if keep < 1:
        raise ValueError(f"keep must be >= 1 (0 in settings means never prune), got {keep}")
    s = search_indexes.c
    with session_scope(settings.manifest_url) as conn:
        complete = conn.execute(sa.select(s.id).where(s.status == "complete")
                                .order_by(s.completed_at.desc(), s.id.desc())).scalars().all()
        kept, dropped = complete[:keep], complete[keep:]
        if dropped:
            conn.execute(search_indexes.update().where(s.id.in_(dropped)).values(status="pruned"))
        gone = conn.execute(sa.select(s.id, s.artifact_prefix)
                            .where(s.status.in_(("pruned", "failed")))).all()
        building = conn.execute(sa.select(sa.func.count()).where(s.status == "building")).scalar()
    store = ObjectStore(settings)
    # One LIST of what is stored (the kept versions, chunks, leftovers), not one per pruned row:
    # the history of pruned rows grows every night, the stored objects do not.
    gone_prefixes = tuple(prefix for _, prefix in gone)
    stored = list(store.list_keys(f"{INDEX_PREFIX}/")) if gone else []
    removed = 0
    for key in stored:
        if gone_prefixes and key.startswith(gone_prefixes):
            store.remove(key)
            removed += 1
    removed_chunks, skipped = 0, None
    if building:
        skipped = f"{building} index build(s) in progress"
    elif gone:  # a few GETs: also collects chunks a skipped run left behind
        listed = set()
        for index_id in kept:
            listed.update(json.loads(store.get_bytes(
                f"{INDEX_PREFIX}/{index_id}/{INDEX_FILE}"))["chunks"])
        for key in stored:
            if key.startswith(CHUNK_PREFIX) and key[len(CHUNK_PREFIX):] not in listed:
                store.remove(key)
                removed_chunks += 1
    cache = cache_dir(settings)
    for index_id, _ in gone:  # hard links: the kept versions' chunks stay where they are
        shutil.rmtree(cache / index_id, ignore_errors=True)
    networks = prune_frozen_networks(cache / NETWORK_CACHE)
    result = {"kept": len(kept), "pruned": list(dropped), "removed_objects": removed,
              "removed_chunks": removed_chunks, "chunks_skipped": skipped,
              "removed_network_files": len(networks)}
    if dropped or removed or removed_chunks or networks:
        log.info("search index retention: %s", result)
    return result


def _prune_quietly(settings: Settings) -> dict | None:
    """The refresh's pruning: never fails the refresh that made a new version current."""
    if not settings.search_keep_versions:
        return None
    try:
        return prune(settings)
    except Exception as exc:  # the next refresh (or `shoplens index prune`) tries again
        log.warning("search index retention failed, nothing lost: %s: %s",
                    type(exc).__name__, exc)
        return {"error": f"{type(exc).__name__}: {exc}"}


# --------------------------------------------------------------------------------------------
# Readers: the current index, the list
# --------------------------------------------------------------------------------------------
def cache_dir(settings: Settings) -> Path:
    if settings.search_cache_dir:
        return Path(settings.search_cache_dir).expanduser()
    base = Path(settings.model_work_dir) if settings.model_work_dir else \
        Path.home() / ".cache" / "shoplens"
    return base / "search-indexes"


def current_index_id(settings: Settings) -> str | None:
    with engine_for(settings.manifest_url).connect() as conn:
        return conn.execute(sa.select(current_search_index.c.id)).scalar()


def load_for_queries(path: str | Path, settings: Settings | None = None):
    """A search index ready to embed query photos: its embedder runs the frozen network kept in
    the local index cache (the one the refresh uses, made there once): a fresh process's first
    query takes about 0.3 s instead of 1.5 s of building Keras, and each photo about 5 ms less
    (13.0 vs 17.8 ms median on one thread at 224 px, ``benchmarks/query_embed.py``). The query's
    vector then comes from the same computation as the index's vectors."""
    from modeling.search_index import SearchIndex

    index = SearchIndex.load(path, settings)
    index.embedder.cache_network(cache_dir(settings or Settings.from_env()) / NETWORK_CACHE)
    return index


def fetch_current(settings: Settings) -> tuple[str, Path]:
    """(id, local directory) of the current index. IndexNotFound when there is none; an
    unreachable manifest or store is ServiceUnreachable."""
    import urllib3.exceptions

    from shoplens.cli import ServiceUnreachable

    try:
        index_id = current_index_id(settings)
        if index_id is None:
            raise IndexNotFound("no search index yet: build one with `shoplens index refresh` "
                                "(or pass --index DIR)")
        return index_id, download(settings, index_id, cache_dir(settings))
    except (sa.exc.OperationalError, urllib3.exceptions.HTTPError) as exc:
        where = ("manifest" if isinstance(exc, sa.exc.OperationalError)
                 else f"object store at {settings.s3_endpoint}")
        raise ServiceUnreachable(f"cannot load the current search index: the {where} is "
                                 f"unreachable ({type(exc).__name__})") from exc


def list_indexes(settings: Settings) -> list[dict]:
    """Every index version, oldest first, the current one marked."""
    s = search_indexes.c
    with engine_for(settings.manifest_url).connect() as conn:
        current = conn.execute(sa.select(current_search_index.c.id)).scalar()
        rows = conn.execute(sa.select(
            s.id, s.parent_id, s.model_id, s.status, s.products, s.vectors, s.added_vectors,
            s.threshold, s.run_key, s.built_at, s.completed_at, s.error)
            .order_by(s.built_at, s.id)).mappings().all()
    return [{**row, "current": row["id"] == current} for row in rows]


"""The nightly dedup stage: hash new images in batches, then fold them into the near-duplicate clusters.

Three steps, each callable on its own (the nightly DAG maps :func:`hash_batch` over the plan, so
several Celery workers share a night), and ``run(settings, run_key)`` doing all three in one
process (CLI, tests):

1. :func:`plan_batches` cuts the images that have no hash of the current ``HASH_VERSION`` (or,
   with the embedding signal on, no embedding of the current version) into sha256 ranges
   (:mod:`shoplens.batches`);
2. :func:`hash_batch` hashes (pHash, dHash) and embeds (:mod:`dataset.dedup.similarity`, same
   decode) what in one range is still missing, reading the bytes from the object store with reads
   in flight ahead of the work, and upserts hashes and vectors in one transaction: a killed batch
   writes nothing, a re-run batch writes the same rows;
3. :func:`decide` loads every hash (and vector) from the manifest and finds the near-duplicates of
   the images that have no cluster yet (multi-index search over all hashes, plus a faiss
   inner-product range search over the vectors for pairs the hashes miss: crops, re-framing,
   confirmed by aligning the two photos' stored thumbnails when ``min_alignment`` is set),
   merges them into the existing clusters, picks each touched cluster's representative (largest
   resolution, then earliest) and writes only rows that changed, in one transaction. Hash pairs
   (and stored clusters) join as connected components, so new images can only merge clusters;
   an embedding-only pair joins two clusters only under a guard
   (:func:`dataset.dedup.similarity.guarded_clusters`: the smaller side has at most
   ``dedup_embedding_max_attach`` images and the two representatives pass the rule), so a chain
   of look-alike photos of one product is not stored as one cluster. The guard depends on the
   order pairs are taken in (best cosine first), so an incremental night can differ from a full
   re-clustering in rare cases (an image attached by an earlier night stays attached).

A changed threshold, hash version, embedding rule or embedding version re-clusters everything. Rerunning with nothing new writes
nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from dataset.dedup.clusters import DuplicateRule, component_labels, find_pairs, representative_order
from dataset.dedup import alignment, similarity
from dataset.dedup.hashing import HASH_VERSION, ImageDecodeError, hamming, hashes_of_image, trim_uniform_border
from dataset.dedup.similarity import EmbeddingRule, embedding_version
from shoplens import batches
from shoplens.batches import Batch
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import crawl_runs, image_dedup, image_embeddings, image_hashes, images
from shoplens.photos import PhotoLimits, decode_photo
from shoplens.progress import progress
from shoplens.store import ObjectStore

STAGE = "dedup"


@dataclass(frozen=True)
class ClusterRow:
    sha256: str
    cluster_id: str
    duplicate_of: str | None
    distance: int | None
    spans_products: bool


def run_id_for(conn: sa.Connection, run_key: str) -> int | None:
    """The crawl run's id for provenance, or None when the run key has no crawl_runs row."""
    return conn.execute(sa.select(crawl_runs.c.id).where(crawl_runs.c.run_key == run_key)).scalar()


@dataclass(frozen=True)
class Todo:
    sha256: str
    object_key: str
    hash: bool         # needs a current-version hash
    older_hash: bool   # ... and had one of another version
    embed: bool        # needs a current-version embedding (signal on)
    older_vector: bool


def _todo(conn: sa.Connection, settings: Settings, batch: Batch | None = None) -> list[Todo]:
    """Images without a current-version hash, or (embedding signal on) without a current-version
    embedding, in a batch's range when given, in sha256 order."""
    stale_hash = sa.or_(image_hashes.c.sha256.is_(None), image_hashes.c.hash_version != HASH_VERSION)
    columns = [images.c.sha256, images.c.object_key, stale_hash, image_hashes.c.sha256.is_not(None)]
    source = images.outerjoin(image_hashes, image_hashes.c.sha256 == images.c.sha256)
    condition = stale_hash
    if settings.dedup_embedding:
        version = embedding_version(settings)
        stale_vector = sa.or_(image_embeddings.c.sha256.is_(None),
                              image_embeddings.c.embedding_version != version)
        columns += [stale_vector, image_embeddings.c.sha256.is_not(None)]
        source = source.outerjoin(image_embeddings, image_embeddings.c.sha256 == images.c.sha256)
        condition = sa.or_(stale_hash, stale_vector)
    query = sa.select(*columns).select_from(source).where(condition).order_by(images.c.sha256)
    if batch is not None:
        query = query.where(batch.where(images.c.sha256))
    return [Todo(r[0], r[1], bool(r[2]), bool(r[2]) and bool(r[3]),
                 bool(r[4]) if len(r) > 4 else False, bool(r[4]) and bool(r[5]) if len(r) > 4 else False)
            for r in conn.execute(query)]


def work_version(settings: Settings) -> str:
    """What a batch is planned for: the hash version, plus the embedding version when that is on."""
    return HASH_VERSION + (f" + {embedding_version(settings)}" if settings.dedup_embedding else "")


def plan_batches(settings: Settings, run_key: str) -> list[Batch]:
    """The night's hashing (and embedding) work as sha256-range batches of ``dedup_hash_batch`` images."""
    with engine_for(settings.manifest_url).connect() as conn:
        todo = [t.sha256 for t in _todo(conn, settings)]
    return batches.plan(todo, stage=STAGE, run_key=run_key, size=settings.dedup_hash_batch,
                        version=work_version(settings))


def hash_batch(settings: Settings, batch: Batch | dict) -> dict:
    """Hash (and embed) what in the batch's range is missing; one transaction for the batch's rows.
    Undecodable or missing objects are reported, not fatal, and retried next night."""
    batch = Batch.of(batch)
    if batch.version != work_version(settings):
        raise RuntimeError(f"{batch.label} was planned for {batch.version!r}, "
                           f"this worker computes {work_version(settings)!r}: plan again")
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        todo = _todo(conn, settings, batch)
        run_id = run_id_for(conn, batch.run_key)
    store = ObjectStore(settings)
    limits = PhotoLimits.from_settings(settings)  # the caps the crawler stored the photos under
    version = embedding_version(settings) if settings.dedup_embedding else None
    hashes, vectors, squares, failures, rehashed, reembedded = [], [], [], [], 0, 0
    thumbnails: dict[str, bytes] = {}

    def embed_pending() -> None:  # a few at a time: decoded photos are not all kept in memory
        if squares:
            shas, arrays = zip(*squares)
            for sha256, vector in zip(shas, similarity.embed_squares(settings, list(arrays))):
                vectors.append({"sha256": sha256, "embedding_version": version, "dim": len(vector),
                                "vector": similarity.to_bytes(vector), "computed_run": run_id,
                                "thumbnail": thumbnails.pop(sha256)})
            squares.clear()

    with progress(total=len(todo), desc=f"dedup hashing, {batch.label}", unit="photos") as shown:
        for item, data, error in store.read_objects(todo, key=lambda t: t.object_key):
            shown.advance()
            if error is not None:  # a missing or unreadable object must not stop the night
                failures.append({"sha256": item.sha256, "reason": f"unreadable object {item.object_key}: "
                                                               f"{type(error).__name__}: {error}"})
                continue
            try:
                trimmed = trim_uniform_border(decode_photo(data, limits).image)
            except ImageDecodeError as exc:
                failures.append({"sha256": item.sha256, "reason": f"undecodable: {exc}"})
                continue
            if item.hash:
                h = hashes_of_image(trimmed, trim_border=False)  # already trimmed, as hashes_of_bytes does
                hashes.append({"sha256": item.sha256, "phash": h.phash, "dhash": h.dhash,
                               "hash_version": HASH_VERSION, "computed_run": run_id})
                rehashed += item.older_hash
            if item.embed:
                squares.append((item.sha256, similarity.square_of(settings, trimmed)))
                thumbnails[item.sha256] = similarity.thumbnail_to_bytes(alignment.thumbnail_of(trimmed))
                reembedded += item.older_vector
                if len(squares) >= similarity.EMBED_CHUNK:
                    embed_pending()
    embed_pending()
    with engine.begin() as conn:  # hashes and vectors of the batch: all or nothing
        if hashes:
            statement = insert(image_hashes).values(hashes)
            conn.execute(statement.on_conflict_do_update(
                index_elements=[image_hashes.c.sha256],
                set_={c: statement.excluded[c] for c in ("phash", "dhash", "hash_version", "computed_run")}
                | {"computed_at": sa.func.now()}))
        for start in range(0, len(vectors), 1000):
            statement = insert(image_embeddings).values(vectors[start:start + 1000])
            conn.execute(statement.on_conflict_do_update(
                index_elements=[image_embeddings.c.sha256],
                set_={c: statement.excluded[c] for c in ("embedding_version", "dim", "vector", "computed_run",
                                                         "thumbnail")}
                | {"computed_at": sa.func.now()}))
    return {"batch": batch.index, "hashed": len(hashes), "rehashed": rehashed,
            "embedded": len(vectors), "reembedded": reembedded, "hash_failures": failures}


def _load_hashed_images(conn: sa.Connection):
    rows = conn.execute(
        sa.select(image_hashes.c.sha256, image_hashes.c.phash, image_hashes.c.dhash,
                  images.c.width, images.c.height, images.c.first_seen_run, images.c.created_at,
                  images.c.product_id)
        .join(images, images.c.sha256 == image_hashes.c.sha256)
        .where(image_hashes.c.hash_version == HASH_VERSION)
        .order_by(image_hashes.c.sha256)).all()
    return rows


def _load_vectors(conn: sa.Connection, shas: list[str], version: str, with_thumbnails: bool):
    """float32 (N, D) vectors of the current version in ``shas`` order, which rows have one, and
    (``with_thumbnails``) their thumbnails (None where absent), else None."""
    columns = [image_embeddings.c.sha256, image_embeddings.c.dim, image_embeddings.c.vector]
    if with_thumbnails:
        columns.append(image_embeddings.c.thumbnail)
    stored = {r.sha256: tuple(r[1:]) for r in conn.execute(
        sa.select(*columns).where(image_embeddings.c.embedding_version == version))}
    dims = {row[0] for row in stored.values()}
    if len(dims) > 1:
        raise RuntimeError(f"image_embeddings rows of version {version!r} differ in dim: {sorted(dims)}")
    dim = dims.pop() if dims else 1
    has = np.array([sha in stored for sha in shas], dtype=bool)
    vectors = np.zeros((len(shas), dim), np.float32)
    if has.any():
        vectors[has] = similarity.from_bytes([stored[sha][1] for sha in shas if sha in stored], dim)
    thumbnails = (similarity.Thumbnails(similarity.thumbnail_from_bytes(stored[sha][2]) if sha in stored else None
                                        for sha in shas) if with_thumbnails else None)
    return vectors, has, thumbnails


def _load_clusters(conn: sa.Connection) -> dict[str, tuple]:
    rows = conn.execute(sa.select(image_dedup.c.sha256, image_dedup.c.cluster_id, image_dedup.c.duplicate_of,
                                  image_dedup.c.distance, image_dedup.c.threshold,
                                  image_dedup.c.spans_products, image_dedup.c.embedding_rule))
    return {r.sha256: (r.cluster_id, r.duplicate_of, r.distance, r.threshold, r.spans_products, r.embedding_rule)
            for r in rows}


@dataclass
class Signals:
    """The second signal's inputs for :func:`assign_clusters` (absent: hashes only)."""
    rule: EmbeddingRule
    vectors: np.ndarray   # (N, D) unit vectors in rows order
    has_vector: np.ndarray  # (N,) bool
    thumbnails: similarity.Thumbnails | None = None  # for the rule's geometric check


def assign_clusters(rows, stored: dict[str, tuple], rule: DuplicateRule, full: bool,
                    signals: Signals | None = None, pair_counts: dict | None = None
                    ) -> tuple[list[ClusterRow], int]:
    """Cluster rows for every image whose cluster may have changed, and how many images were queried.
    ``pair_counts`` (when given) receives the number of near-duplicate pairs found by the hashes
    and by the embedding alone (pairs the hash rule did not already accept).

    Incremental (``full`` false): only images without a stored row are searched for neighbours;
    stored clusters stay joined through their representative and merge with what the new images
    touch. Full: every image is searched and stored clusters are ignored.
    """
    shas = [r.sha256 for r in rows]
    position = {sha: k for k, sha in enumerate(shas)}
    phash = np.array([r.phash for r in rows], dtype=np.int64)
    dhash = np.array([r.dhash for r in rows], dtype=np.int64)
    queries = (np.arange(len(rows)) if full
               else np.array([k for k, sha in enumerate(shas) if sha not in stored], dtype=np.int64))
    if len(queries) == 0:
        return [], 0
    pairs = find_pairs(phash, dhash, rule, queries)
    counts = {"hash": len(pairs), "embedding": 0}
    trusted = None
    if not full:  # keep existing clusters together: each member linked to its representative
        links = [(position[sha], position[cluster]) for sha, (cluster, *_) in stored.items()
                 if sha in position and cluster in position and sha != cluster]
        if links:
            linked = np.array(links, dtype=np.int64)
            trusted = (linked[:, 0], linked[:, 1])
    if signals is None:
        first, second = [pairs.first], [pairs.second]
        if trusted is not None:
            first.append(trusted[0])
            second.append(trusted[1])
        labels = component_labels(len(rows), np.concatenate(first), np.concatenate(second))
    else:
        extra = similarity.find_embedding_pairs(signals.vectors, phash, dhash, signals.rule, queries,
                                                signals.has_vector, signals.thumbnails)
        n = np.int64(max(len(rows), 1))
        new = ~np.isin(extra.first * n + extra.second, pairs.first * n + pairs.second)
        extra = similarity.EmbeddingPairs(extra.first[new], extra.second[new], extra.cosine[new],
                                          extra.hash_distance[new])
        counts["embedding"] = len(extra)
        priority = np.empty(len(rows), dtype=np.int64)
        priority[representative_order([r.width * r.height for r in rows],
                                      [(r.first_seen_run, r.created_at) for r in rows], shas)] = np.arange(len(rows))
        labels = similarity.guarded_clusters(len(rows), pairs, extra, signals.rule, rule.threshold,
                                             signals.vectors, phash, dhash, priority, signals.has_vector,
                                             trusted, signals.thumbnails)
    if pair_counts is not None:
        pair_counts.update(counts)
    touched = np.unique(labels[queries])
    members_of: dict[int, list[int]] = {}
    for k in np.flatnonzero(np.isin(labels, touched)):
        members_of.setdefault(int(labels[k]), []).append(int(k))

    result = []
    for members in members_of.values():
        order = representative_order([rows[k].width * rows[k].height for k in members],
                                     [(rows[k].first_seen_run, rows[k].created_at) for k in members],
                                     [shas[k] for k in members])
        rep = members[order[0]]
        spans = len({rows[k].product_id for k in members}) > 1
        for k in members:
            is_rep = k == rep
            distance = None if is_rep else (hamming(rows[k].phash, rows[rep].phash)
                                            + hamming(rows[k].dhash, rows[rep].dhash))
            result.append(ClusterRow(shas[k], shas[rep], None if is_rep else shas[rep], distance, spans))
    return result, len(queries)


def _write_changes(conn: sa.Connection, decided: list[ClusterRow], stored: dict[str, tuple],
                   threshold: int, embedding_rule: str | None, run_id: int | None) -> int:
    changed = [row for row in decided
               if stored.get(row.sha256) != (row.cluster_id, row.duplicate_of, row.distance, threshold,
                                             row.spans_products, embedding_rule)]
    for start in range(0, len(changed), 5000):
        values = [{"sha256": r.sha256, "cluster_id": r.cluster_id, "duplicate_of": r.duplicate_of,
                   "distance": r.distance, "threshold": threshold, "spans_products": r.spans_products,
                   "embedding_rule": embedding_rule, "run_id": run_id} for r in changed[start:start + 5000]]
        statement = insert(image_dedup).values(values)
        conn.execute(statement.on_conflict_do_update(
            index_elements=[image_dedup.c.sha256],
            set_={c: statement.excluded[c] for c in ("cluster_id", "duplicate_of", "distance", "threshold",
                                                     "spans_products", "embedding_rule", "run_id")}
            | {"decided_at": sa.func.now()}))
    return len(changed)


def decide(settings: Settings, run_key: str, hashing: list[dict] | None = None) -> dict:
    """Cluster over every stored hash (see the module docstring); ``hashing`` is the night's
    :func:`hash_batch` results (a rehashed image re-clusters everything)."""
    started = time.perf_counter()
    hashing = list(hashing or [])
    rule = DuplicateRule(settings.dedup_threshold)
    embedding = EmbeddingRule.from_settings(settings)
    version = embedding_version(settings) if embedding else None
    rule_text = f"{embedding.describe()}; {version}" if embedding else None
    engine = engine_for(settings.manifest_url)
    rehashed = sum(h["rehashed"] + h.get("reembedded", 0) for h in hashing)
    with engine.begin() as conn:
        # One clustering at a time: two concurrent runs would each miss the other's new images.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('shoplens.dedup'))"))
        run_id = run_id_for(conn, run_key)
        rows = _load_hashed_images(conn)
        stored = _load_clusters(conn)
        signals = None
        if embedding is not None:
            vectors, has_vector, thumbnails = _load_vectors(conn, [r.sha256 for r in rows], version,
                                                            embedding.min_alignment is not None)
            signals = Signals(embedding, vectors, has_vector, thumbnails)
        full = rehashed > 0 or any(v[3] != rule.threshold or v[5] != rule_text for v in stored.values())
        pair_counts: dict = {}
        decided, queried = assign_clusters(rows, stored, rule, full, signals, pair_counts)
        changed = _write_changes(conn, decided, stored, rule.threshold, rule_text, run_id)
        totals = conn.execute(sa.text(
            "SELECT count(*) AS images, count(DISTINCT cluster_id) AS clusters,"
            " count(*) FILTER (WHERE duplicate_of IS NOT NULL) AS duplicates,"
            " count(DISTINCT cluster_id) FILTER (WHERE spans_products) AS spanning"
            " FROM image_dedup")).one()
    return {
        "run_key": run_key, "run_id": run_id, "hash_version": HASH_VERSION, "threshold": rule.threshold,
        "embedding_rule": rule_text, "mode": "full" if full else "incremental", "batches": len(hashing),
        "hashed": sum(h["hashed"] for h in hashing), "rehashed": sum(h["rehashed"] for h in hashing),
        "embedded": sum(h.get("embedded", 0) for h in hashing),
        "reembedded": sum(h.get("reembedded", 0) for h in hashing),
        # near-duplicate pairs found this run: by the hash rule, and by the embedding alone
        "pairs_by_signal": {"hash": pair_counts.get("hash", 0), "embedding": pair_counts.get("embedding", 0)},
        "hash_failures": [f for h in hashing for f in h["hash_failures"]],
        "queried": queried, "rows_changed": changed,
        "images_clustered": totals.images, "clusters": totals.clusters, "duplicates": totals.duplicates,
        "clusters_spanning_products": totals.spanning,
        "seconds": round(time.perf_counter() - started, 2),
    }


def run(settings: Settings, run_key: str) -> dict:
    """Plan, hash every batch, decide: the whole stage in one process. JSON-serialisable stats."""
    started = time.perf_counter()
    hashing = [hash_batch(settings, batch) for batch in plan_batches(settings, run_key)]
    stats = decide(settings, run_key, hashing)
    stats["seconds"] = round(time.perf_counter() - started, 2)
    return stats

"""The nightly dedup stage: hash new images in batches, then fold them into the near-duplicate clusters.

Three steps, each callable on its own (the nightly DAG maps :func:`hash_batch` over the plan, so
several Celery workers share a night), and ``run(settings, run_key)`` doing all three in one
process (CLI, tests):

1. :func:`plan_batches` cuts the images that have no hash of the current ``HASH_VERSION`` into
   sha256 ranges (:mod:`shoplens.batches`);
2. :func:`hash_batch` hashes (pHash, dHash) what in one range is still unhashed, reading the bytes
   from the object store with reads in flight ahead of the hashing, and upserts the hashes in one
   transaction: a killed batch writes nothing, a re-run batch writes the same rows;
3. :func:`decide` loads every hash from the manifest and finds the near-duplicates of the images
   that have no cluster yet (multi-index search over all hashes), merges them into the existing
   clusters (clusters are connected components, so new images can only merge clusters), picks
   each touched cluster's representative (largest resolution, then earliest) and writes only rows
   that changed, in one transaction.

A changed threshold or hash version re-clusters everything. Rerunning with nothing new writes
nothing.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from dataset.dedup.clusters import DuplicateRule, component_labels, find_pairs, representative_order
from dataset.dedup.hashing import HASH_VERSION, ImageDecodeError, hamming, hashes_of_bytes
from shoplens import batches
from shoplens.batches import Batch
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import crawl_runs, image_dedup, image_hashes, images
from shoplens.photos import PhotoLimits
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


def _unhashed(conn: sa.Connection, batch: Batch | None = None) -> list[tuple[str, str, bool]]:
    """(sha256, object_key, had_older_hash) of images without a current-version hash (in a batch's
    range when given), in sha256 order."""
    query = (sa.select(images.c.sha256, images.c.object_key, image_hashes.c.sha256.is_not(None))
             .select_from(images.outerjoin(image_hashes, image_hashes.c.sha256 == images.c.sha256))
             .where(sa.or_(image_hashes.c.sha256.is_(None), image_hashes.c.hash_version != HASH_VERSION))
             .order_by(images.c.sha256))
    if batch is not None:
        query = query.where(batch.where(images.c.sha256))
    return [tuple(r) for r in conn.execute(query)]


def plan_batches(settings: Settings, run_key: str) -> list[Batch]:
    """The night's hashing work as sha256-range batches of ``dedup_hash_batch`` images."""
    with engine_for(settings.manifest_url).connect() as conn:
        todo = [sha for sha, _, _ in _unhashed(conn)]
    return batches.plan(todo, stage=STAGE, run_key=run_key, size=settings.dedup_hash_batch,
                        version=HASH_VERSION)


def hash_batch(settings: Settings, batch: Batch | dict) -> dict:
    """Hash what in the batch's range has no current hash; one transaction for the batch's rows.
    Undecodable or missing objects are reported, not fatal, and retried next night."""
    batch = Batch.of(batch)
    if batch.version != HASH_VERSION:
        raise RuntimeError(f"{batch.label} was planned for hash version {batch.version!r}, "
                           f"this worker hashes {HASH_VERSION!r}: plan again")
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        todo = _unhashed(conn, batch)
        run_id = run_id_for(conn, batch.run_key)
    store = ObjectStore(settings)
    limits = PhotoLimits.from_settings(settings)  # the caps the crawler stored the photos under
    values, failures, rehashed = [], [], 0
    with progress(total=len(todo), desc=f"dedup hashing, {batch.label}", unit="photos") as shown:
        for (sha256, object_key, older), data, error in batches.prefetch(
                todo, lambda row: store.get_bytes(row[1])):
            shown.advance()
            if error is not None:  # a missing or unreadable object must not stop the night
                failures.append({"sha256": sha256, "reason": f"unreadable object {object_key}: "
                                                          f"{type(error).__name__}: {error}"})
                continue
            try:
                h = hashes_of_bytes(data, limits=limits)
            except ImageDecodeError as exc:
                failures.append({"sha256": sha256, "reason": f"undecodable: {exc}"})
                continue
            values.append({"sha256": sha256, "phash": h.phash, "dhash": h.dhash,
                           "hash_version": HASH_VERSION, "computed_run": run_id})
            rehashed += older
    if values:
        statement = insert(image_hashes).values(values)
        statement = statement.on_conflict_do_update(
            index_elements=[image_hashes.c.sha256],
            set_={c: statement.excluded[c] for c in ("phash", "dhash", "hash_version", "computed_run")}
            | {"computed_at": sa.func.now()})
        with engine.begin() as conn:
            conn.execute(statement)
    return {"batch": batch.index, "hashed": len(values), "rehashed": rehashed,
            "hash_failures": failures}


def _load_hashed_images(conn: sa.Connection):
    rows = conn.execute(
        sa.select(image_hashes.c.sha256, image_hashes.c.phash, image_hashes.c.dhash,
                  images.c.width, images.c.height, images.c.first_seen_run, images.c.created_at,
                  images.c.product_id)
        .join(images, images.c.sha256 == image_hashes.c.sha256)
        .where(image_hashes.c.hash_version == HASH_VERSION)
        .order_by(image_hashes.c.sha256)).all()
    return rows


def _load_clusters(conn: sa.Connection) -> dict[str, tuple]:
    rows = conn.execute(sa.select(image_dedup.c.sha256, image_dedup.c.cluster_id, image_dedup.c.duplicate_of,
                                  image_dedup.c.distance, image_dedup.c.threshold,
                                  image_dedup.c.spans_products))
    return {r.sha256: (r.cluster_id, r.duplicate_of, r.distance, r.threshold, r.spans_products) for r in rows}


def assign_clusters(rows, stored: dict[str, tuple], rule: DuplicateRule, full: bool) -> tuple[list[ClusterRow], int]:
    """Cluster rows for every image whose cluster may have changed, and how many images were queried.

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
    first, second = [pairs.first], [pairs.second]
    if not full:  # keep existing clusters together: each member linked to its representative
        links = [(position[sha], position[cluster]) for sha, (cluster, *_) in stored.items()
                 if sha in position and cluster in position and sha != cluster]
        if links:
            linked = np.array(links, dtype=np.int64)
            first.append(linked[:, 0])
            second.append(linked[:, 1])
    labels = component_labels(len(rows), np.concatenate(first), np.concatenate(second))
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
                   threshold: int, run_id: int | None) -> int:
    changed = [row for row in decided
               if stored.get(row.sha256) != (row.cluster_id, row.duplicate_of, row.distance, threshold,
                                             row.spans_products)]
    for start in range(0, len(changed), 5000):
        values = [{"sha256": r.sha256, "cluster_id": r.cluster_id, "duplicate_of": r.duplicate_of,
                   "distance": r.distance, "threshold": threshold, "spans_products": r.spans_products,
                   "run_id": run_id} for r in changed[start:start + 5000]]
        statement = insert(image_dedup).values(values)
        conn.execute(statement.on_conflict_do_update(
            index_elements=[image_dedup.c.sha256],
            set_={c: statement.excluded[c] for c in ("cluster_id", "duplicate_of", "distance", "threshold",
                                                     "spans_products", "run_id")}
            | {"decided_at": sa.func.now()}))
    return len(changed)


def decide(settings: Settings, run_key: str, hashing: list[dict] | None = None) -> dict:
    """Cluster over every stored hash (see the module docstring); ``hashing`` is the night's
    :func:`hash_batch` results (a rehashed image re-clusters everything)."""
    started = time.perf_counter()
    hashing = list(hashing or [])
    rule = DuplicateRule(settings.dedup_threshold)
    engine = engine_for(settings.manifest_url)
    rehashed = sum(h["rehashed"] for h in hashing)
    with engine.begin() as conn:
        # One clustering at a time: two concurrent runs would each miss the other's new images.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('shoplens.dedup'))"))
        run_id = run_id_for(conn, run_key)
        rows = _load_hashed_images(conn)
        stored = _load_clusters(conn)
        full = rehashed > 0 or any(v[3] != rule.threshold for v in stored.values())
        decided, queried = assign_clusters(rows, stored, rule, full)
        changed = _write_changes(conn, decided, stored, rule.threshold, run_id)
        totals = conn.execute(sa.text(
            "SELECT count(*) AS images, count(DISTINCT cluster_id) AS clusters,"
            " count(*) FILTER (WHERE duplicate_of IS NOT NULL) AS duplicates,"
            " count(DISTINCT cluster_id) FILTER (WHERE spans_products) AS spanning"
            " FROM image_dedup")).one()
    return {
        "run_key": run_key, "run_id": run_id, "hash_version": HASH_VERSION, "threshold": rule.threshold,
        "mode": "full" if full else "incremental", "batches": len(hashing),
        "hashed": sum(h["hashed"] for h in hashing), "rehashed": rehashed,
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

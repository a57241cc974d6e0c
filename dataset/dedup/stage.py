"""The nightly dedup stage: hash new images, then fold them into the near-duplicate clusters.

``run(settings, run_key)``:
1. hashes (pHash, dHash) every stored image that has no hash of the current ``HASH_VERSION`` yet,
   reading its bytes from the object store; committed in batches, so a crash keeps what was done;
2. loads every hash from the manifest and finds the near-duplicates of the images that have no
   cluster yet (multi-index search over all hashes);
3. merges them into the existing clusters (clusters are connected components, so new images can
   only merge clusters), picks each touched cluster's representative (largest resolution, then
   earliest) and writes only rows that changed, in one transaction.

A changed threshold or hash version re-clusters everything. Rerunning with nothing new writes
nothing.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert

from dataset.dedup.clusters import DuplicateRule, component_labels, find_pairs, representative_order
from dataset.dedup.hashing import HASH_VERSION, ImageDecodeError, hamming, hashes_of_bytes
from shoplens.config import Settings
from shoplens.manifest import engine_for
from shoplens.manifest.schema import crawl_runs, image_dedup, image_hashes, images
from shoplens.photos import PhotoLimits
from shoplens.progress import progress
from shoplens.store import ObjectStore

READ_THREADS = 4  # object-store reads overlap; hashing a decoded image releases the GIL in Pillow


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


def _unhashed(conn: sa.Connection) -> list[tuple[str, str, bool]]:
    """(sha256, object_key, had_older_hash) of images without a current-version hash."""
    rows = conn.execute(
        sa.select(images.c.sha256, images.c.object_key, image_hashes.c.sha256.is_not(None))
        .select_from(images.outerjoin(image_hashes, image_hashes.c.sha256 == images.c.sha256))
        .where(sa.or_(image_hashes.c.sha256.is_(None), image_hashes.c.hash_version != HASH_VERSION))
        .order_by(images.c.sha256))
    return [tuple(r) for r in rows]


def _hash_one(store: ObjectStore, limits: PhotoLimits, sha256: str, object_key: str):
    try:
        return sha256, hashes_of_bytes(store.get_bytes(object_key), limits=limits), None
    except ImageDecodeError as exc:
        return sha256, None, f"undecodable: {exc}"
    except Exception as exc:  # noqa: BLE001 - a missing or unreadable object must not stop the run
        return sha256, None, f"unreadable object {object_key}: {type(exc).__name__}: {exc}"


def hash_new_images(settings: Settings, run_id: int | None) -> dict:
    """Hash every image lacking a current hash; failures are reported, not fatal, and retried next run."""
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        todo = _unhashed(conn)
    store = ObjectStore(settings)
    limits = PhotoLimits.from_settings(settings)  # the caps the crawler stored the photos under
    hashed, rehashed, failures = 0, 0, []
    batch = max(1, settings.dedup_hash_batch)
    with ThreadPoolExecutor(READ_THREADS) as pool, \
            progress(total=len(todo), desc="dedup hashing", unit="photos") as shown:
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            results = list(pool.map(lambda row: _hash_one(store, limits, row[0], row[1]), chunk))
            values = [{"sha256": sha, "phash": h.phash, "dhash": h.dhash, "hash_version": HASH_VERSION,
                       "computed_run": run_id} for sha, h, _ in results if h is not None]
            failures += [{"sha256": sha, "reason": why} for sha, h, why in results if h is None]
            if values:
                statement = insert(image_hashes).values(values)
                statement = statement.on_conflict_do_update(
                    index_elements=[image_hashes.c.sha256],
                    set_={c: statement.excluded[c] for c in ("phash", "dhash", "hash_version", "computed_run")}
                    | {"computed_at": sa.func.now()})
                with engine.begin() as conn:
                    conn.execute(statement)
            hashed += len(values)
            rehashed += sum(1 for (_, _, older), (_, h, _) in zip(chunk, results) if older and h is not None)
            shown.advance(len(chunk))
    return {"hashed": hashed, "rehashed": rehashed, "hash_failures": failures}


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


def run(settings: Settings, run_key: str) -> dict:
    """Hash new images and update near-duplicate clusters; returns JSON-serialisable stats."""
    started = time.perf_counter()
    rule = DuplicateRule(settings.dedup_threshold)
    engine = engine_for(settings.manifest_url)
    with engine.connect() as conn:
        run_id = run_id_for(conn, run_key)
    hashing = hash_new_images(settings, run_id)
    with engine.begin() as conn:
        # One clustering at a time: two concurrent runs would each miss the other's new images.
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('shoplens.dedup'))"))
        rows = _load_hashed_images(conn)
        stored = _load_clusters(conn)
        full = hashing["rehashed"] > 0 or any(v[3] != rule.threshold for v in stored.values())
        decided, queried = assign_clusters(rows, stored, rule, full)
        changed = _write_changes(conn, decided, stored, rule.threshold, run_id)
        totals = conn.execute(sa.text(
            "SELECT count(*) AS images, count(DISTINCT cluster_id) AS clusters,"
            " count(*) FILTER (WHERE duplicate_of IS NOT NULL) AS duplicates,"
            " count(DISTINCT cluster_id) FILTER (WHERE spans_products) AS spanning"
            " FROM image_dedup")).one()
    return {
        "run_key": run_key, "run_id": run_id, "hash_version": HASH_VERSION, "threshold": rule.threshold,
        "mode": "full" if full else "incremental",
        "hashed": hashing["hashed"], "rehashed": hashing["rehashed"],
        "hash_failures": hashing["hash_failures"], "queried": queried, "rows_changed": changed,
        "images_clustered": totals.images, "clusters": totals.clusters, "duplicates": totals.duplicates,
        "clusters_spanning_products": totals.spanning,
        "seconds": round(time.perf_counter() - started, 2),
    }

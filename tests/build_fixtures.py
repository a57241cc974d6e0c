"""A small populated manifest for the dataset-build tests: crawl, dedup and filter rows written
with plain SQL, and real (tiny) JPEGs stored in the test's SeaweedFS bucket."""
from __future__ import annotations

import hashlib
import io
import itertools

import numpy as np
import sqlalchemy as sa
from PIL import Image

from shoplens.config import Settings
from shoplens.manifest import engine_for, upgrade
from shoplens.store import ObjectStore


def migrate_for_build(url: str) -> None:
    """Apply every migration (the build reads 0002's image_dedup and 0003's kept_images)."""
    upgrade(url)


def jpeg_bytes(seed: int, size: int = 16) -> bytes:
    """A unique, real JPEG: seeded noise, so every seed gives different bytes."""
    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


class ManifestWriter:
    """Writes crawl/dedup/filter rows the way those stages would, for one test's database."""

    def __init__(self, url: str, settings: Settings, image_size: int = 16):
        self.url = url
        self.image_size = image_size
        self.engine = engine_for(url)
        self.store = ObjectStore(settings)
        self._review_ids = itertools.count(1_000_001)
        self._seeds = itertools.count(1)
        self.run_id = self.crawl_run("crawl-1")
        self.filter_run_id = self._filter_run("filter-1")

    def crawl_run(self, run_key: str) -> int:
        with self.engine.begin() as conn:
            self.run_id = conn.execute(sa.text(
                "INSERT INTO crawl_runs (run_key, status, shop_base_url, started_at)"
                " VALUES (:k, 'success', 'http://127.0.0.1:8611', now()) RETURNING id"),
                {"k": run_key}).scalar_one()
        return self.run_id

    def _filter_run(self, run_key: str) -> int:
        with self.engine.begin() as conn:
            return conn.execute(sa.text(
                "INSERT INTO filter_runs (run_key, status, detector_version, rule_version, params,"
                " stats) VALUES (:k, 'success', 'yolox_nano-test', 'rules-test', '{}', '{}')"
                " RETURNING id"), {"k": run_key}).scalar_one()

    def product(self, product_id: int, category_id: str = "10120000", name: str | None = None) -> int:
        with self.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO categories (id, name, first_seen_run, last_seen_run)"
                " VALUES (:c, :c, :r, :r) ON CONFLICT (id) DO NOTHING"),
                {"c": category_id, "r": self.run_id})
            conn.execute(sa.text(
                "INSERT INTO products (id, category_id, name, source_url, first_seen_run,"
                " last_seen_run) VALUES (:p, :c, :n, :u, :r, :r)"),
                {"p": product_id, "c": category_id, "n": name or f"product {product_id}",
                 "u": f"http://127.0.0.1:8611/productions/{product_id}/selling", "r": self.run_id})
        return product_id

    def photo(self, product_id: int, *, cluster_of: str | None = None, passed: bool = True,
              failed_rule: str = "product_occupancy", override: str | None = None,
              seed: int | None = None, data: bytes | None = None) -> str:
        """Store a new review photo of ``product_id``; returns its sha256.

        ``cluster_of``: make it a near-duplicate of that (representative) image.
        ``passed``: the filter's verdict; a rejected photo fails ``failed_rule``.
        ``override``: 'keep' or 'reject' by a human, with a reason.
        ``data``: these JPEG bytes (``image_size`` square) instead of seeded noise.
        """
        if data is None:
            data = jpeg_bytes(next(self._seeds) if seed is None else seed, self.image_size)
        sha = hashlib.sha256(data).hexdigest()
        key, _ = self.store.put_image(data, "jpeg", sha)
        review_id = next(self._review_ids)
        with self.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO reviews (id, product_id, created_date, stars, source_url,"
                " first_seen_run, photo_url) VALUES (:id, :p, DATE '2026-05-01', 5, :u, :r, :ph)"),
                {"id": review_id, "p": product_id, "r": self.run_id,
                 "u": f"http://127.0.0.1:8611/api/productions/{product_id}/reviews?page=1",
                 "ph": f"http://127.0.0.1:8612/reviews/{review_id}.jpg"})
            conn.execute(sa.text(
                "INSERT INTO images (sha256, object_key, size_bytes, width, height, format,"
                " source_url, review_id, product_id, first_seen_run)"
                " VALUES (:s, :k, :n, :side, :side, 'jpeg', :u, :rv, :p, :r)"),
                {"s": sha, "k": key, "n": len(data), "rv": review_id, "p": product_id,
                 "side": self.image_size,
                 "r": self.run_id, "u": f"http://127.0.0.1:8612/reviews/{review_id}.jpg?w=1280&h=1280"})
            conn.execute(sa.text(
                "INSERT INTO review_photos (review_id, sha256, run_id) VALUES (:rv, :s, :r)"),
                {"rv": review_id, "s": sha, "r": self.run_id})
            for rule in ("product_occupancy", "single_product", "min_side"):
                ok = passed or rule != failed_rule
                conn.execute(sa.text(
                    "INSERT INTO rule_decisions (sha256, rule, run_id, passed, score, reason,"
                    " rule_version, detector_version, params)"
                    " VALUES (:s, :rule, :run, :ok, 0.5, :why, 'rules-test', 'yolox_nano-test', '{}')"),
                    {"s": sha, "rule": rule, "run": self.filter_run_id, "ok": ok,
                     "why": None if ok else f"{rule} below threshold"})
            if override:
                conn.execute(sa.text(
                    "INSERT INTO image_overrides (sha256, verdict, reason) VALUES (:s, :v, :why)"),
                    {"s": sha, "v": override, "why": "checked by a person"})
            self._set_cluster(conn, sha, cluster_of)
        return sha

    def _set_cluster(self, conn, sha: str, representative: str | None) -> None:
        conn.execute(sa.text(
            "INSERT INTO image_dedup (sha256, cluster_id, duplicate_of, distance, threshold,"
            " spans_products, run_id) VALUES (:s, :c, :d, :dist, 6, false, :r)"),
            {"s": sha, "c": representative or sha, "d": representative,
             "dist": 2 if representative else None, "r": self.run_id})
        self._mark_spanning(conn, representative or sha)

    @staticmethod
    def _mark_spanning(conn, cluster_id: str) -> None:
        conn.execute(sa.text("""
            UPDATE image_dedup SET spans_products = (
                SELECT count(DISTINCT i.product_id) > 1 FROM image_dedup d
                JOIN images i ON i.sha256 = d.sha256 WHERE d.cluster_id = :c)
            WHERE cluster_id = :c"""), {"c": cluster_id})

    def make_representative(self, new_rep: str, old_rep: str) -> None:
        """Dedup re-ran and chose ``new_rep`` as the cluster's representative instead of ``old_rep``."""
        with self.engine.begin() as conn:
            members = conn.execute(sa.text(
                "SELECT sha256 FROM image_dedup WHERE cluster_id = :c"), {"c": old_rep}).scalars().all()
            for member in members:
                conn.execute(sa.text(
                    "UPDATE image_dedup SET cluster_id = :n,"
                    " duplicate_of = CASE WHEN sha256 = :n THEN NULL ELSE :n END,"
                    " distance = CASE WHEN sha256 = :n THEN NULL ELSE 2 END WHERE sha256 = :s"),
                    {"n": new_rep, "s": member})

    def reject(self, sha: str, rule: str = "single_product") -> None:
        """A later filter run rejects an image that was kept before."""
        run_id = self._filter_run(f"filter-reject-{sha[:8]}")
        with self.engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO rule_decisions (sha256, rule, run_id, passed, score, reason,"
                " rule_version, detector_version, params) VALUES (:s, :rule, :run, false, 0.9,"
                " 'second product in frame', 'rules-test', 'yolox_nano-test', '{}')"),
                {"s": sha, "rule": rule, "run": run_id})

    def photos(self, product_id: int, count: int) -> list[str]:
        return [self.photo(product_id) for _ in range(count)]

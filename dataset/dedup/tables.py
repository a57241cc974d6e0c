"""SQLAlchemy Core view of the dedup stage's manifest tables (created by migration 0002_dedup)."""
from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

# Referenced tables, declared minimally so foreign keys resolve within this metadata.
_images = sa.Table("images", metadata, sa.Column("sha256", sa.CHAR(64), primary_key=True))
_crawl_runs = sa.Table("crawl_runs", metadata, sa.Column("id", sa.BigInteger, primary_key=True))

image_hashes = sa.Table(
    "image_hashes",
    metadata,
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
    sa.Column("phash", sa.BigInteger, nullable=False),  # signed two's complement of the 64 bits
    sa.Column("dhash", sa.BigInteger, nullable=False),
    sa.Column("hash_version", sa.Text, nullable=False),
    sa.Column("computed_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
    sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

image_dedup = sa.Table(
    "image_dedup",
    metadata,
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
    sa.Column("cluster_id", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
    sa.Column("duplicate_of", sa.CHAR(64), sa.ForeignKey("images.sha256")),
    sa.Column("distance", sa.Integer),  # pHash + dHash distance to the representative
    sa.Column("threshold", sa.Integer, nullable=False),
    sa.Column("spans_products", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
    sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

duplicate_clusters_for_review = sa.Table(
    "duplicate_clusters_for_review",
    metadata,
    sa.Column("cluster_id", sa.CHAR(64)),
    sa.Column("products", sa.ARRAY(sa.BigInteger)),
    sa.Column("members", sa.ARRAY(sa.CHAR(64))),
)

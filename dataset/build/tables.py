"""SQLAlchemy Core view of the dataset build's tables (schema: migration 0004_dataset)."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

SPLITS = ("train", "val", "test")

# A product's label, assigned once and never changed or reused.
label_map = sa.Table(
    "label_map", metadata,
    sa.Column("label", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("product_id", sa.BigInteger, nullable=False, unique=True),
    sa.Column("first_version", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)

dataset_versions = sa.Table(
    "dataset_versions", metadata,
    sa.Column("version_id", sa.Text, primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False, unique=True),
    sa.Column("parent_version", sa.Text),
    sa.Column("run_key", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False, server_default="building"),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("code_version", sa.Text, nullable=False),
    sa.Column("params", JSONB, nullable=False),
    sa.Column("counts", JSONB, nullable=False),
    sa.Column("excluded_products", JSONB, nullable=False),
    sa.Column("content_hash", sa.CHAR(64), nullable=False),
    sa.Column("uri", sa.Text, nullable=False),
    sa.Column("error", sa.Text),
)

# Snapshot of each member with its provenance as it was at build time.
dataset_members = sa.Table(
    "dataset_members", metadata,
    sa.Column("version_id", sa.Text, primary_key=True),
    sa.Column("sha256", sa.CHAR(64), primary_key=True),
    sa.Column("label", sa.Integer, nullable=False),
    sa.Column("product_id", sa.BigInteger, nullable=False),
    sa.Column("split", sa.Text, nullable=False),
    sa.Column("cluster_id", sa.CHAR(64), nullable=False),
    sa.Column("object_key", sa.Text, nullable=False),
    sa.Column("product_name", sa.Text, nullable=False),
    sa.Column("category_id", sa.Text, nullable=False),
    sa.Column("review_id", sa.BigInteger, nullable=False),
    sa.Column("source_url", sa.Text, nullable=False),
    sa.Column("crawl_run", sa.BigInteger, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("format", sa.Text, nullable=False),
)

# Columns of a member row that the export carries, in the export's column order.
MEMBER_EXPORT_COLUMNS = (
    "sha256", "object_key", "label", "product_id", "product_name", "category_id", "split",
    "review_id", "source_url", "crawl_run", "width", "height", "format",
)

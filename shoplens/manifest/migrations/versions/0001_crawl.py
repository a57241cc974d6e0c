"""Crawl stage: runs, categories, products, rank history, reviews, images, failures.

Revision ID: 0001_crawl
Revises:
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0001_crawl"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "crawl_runs",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("run_key", sa.Text, nullable=False, unique=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("shop_base_url", sa.Text, nullable=False),
        sa.Column("settings", JSONB, nullable=False, server_default="{}"),
        sa.Column("stats", JSONB, nullable=False, server_default="{}"),
        sa.CheckConstraint("status IN ('running', 'success', 'failed')", name="crawl_runs_status"),
    )
    op.create_table(
        "categories",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("name", sa.Text),
        sa.Column("source_url", sa.Text),
        sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
        sa.Column("last_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    )
    op.create_table(
        "products",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("category_id", sa.Text, sa.ForeignKey("categories.id"), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("brand", sa.Text),
        sa.Column("price", sa.BigInteger),
        sa.Column("rank", sa.Integer),
        sa.Column("review_count", sa.Integer),
        sa.Column("rating", sa.Float),
        sa.Column("source_url", sa.Text, nullable=False),
        sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
        sa.Column("last_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
        sa.Column("first_seen_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("reviews_synced_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
    )
    op.create_index("products_category", "products", ["category_id"])
    op.create_table(
        "product_ranks",
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), primary_key=True),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), primary_key=True),
        sa.Column("category_id", sa.Text, sa.ForeignKey("categories.id"), nullable=False),
        sa.Column("rank", sa.Integer, nullable=False),
        sa.Column("review_count", sa.Integer),
        sa.Column("rating", sa.Float),
        sa.Column("source_url", sa.Text, nullable=False),
    )
    op.create_table(
        "reviews",
        sa.Column("id", sa.BigInteger, primary_key=True),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False),
        sa.Column("created_date", sa.Date),
        sa.Column("stars", sa.Float),
        sa.Column("comment", sa.Text),
        sa.Column("writer_nickname", sa.Text),
        sa.Column("photo_url", sa.Text),
        sa.Column("source_url", sa.Text, nullable=False),
        sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    )
    op.create_index("reviews_product", "reviews", ["product_id"])
    op.create_table(
        "images",
        sa.Column("sha256", sa.CHAR(64), primary_key=True),
        sa.Column("object_key", sa.Text, nullable=False, unique=True),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("source_url", sa.Text, nullable=False),
        sa.Column("review_id", sa.BigInteger, sa.ForeignKey("reviews.id"), nullable=False),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False),
        sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="images_sha256_hex"),
        sa.CheckConstraint("width > 0 AND height > 0 AND size_bytes > 0", name="images_positive"),
    )
    op.create_index("images_product", "images", ["product_id"])
    op.create_index("images_run", "images", ["first_seen_run"])
    op.create_table(
        "review_photos",
        sa.Column("review_id", sa.BigInteger, sa.ForeignKey("reviews.id"), primary_key=True),
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    )
    op.create_index("review_photos_sha256", "review_photos", ["sha256"])
    op.create_table(
        "crawl_failures",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
        sa.Column("category_id", sa.Text),
        sa.Column("product_id", sa.BigInteger),
        sa.Column("review_id", sa.BigInteger),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("stage", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("detail", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_index("crawl_failures_run", "crawl_failures", ["run_id"])


def downgrade() -> None:
    for table in ("crawl_failures", "review_photos", "images", "reviews", "product_ranks",
                  "products", "categories", "crawl_runs"):
        op.drop_table(table)

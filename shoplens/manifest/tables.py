"""SQLAlchemy Core tables of the PostgreSQL manifest (the crawl stage's part).

The schema itself is created and evolved only by the Alembic migrations in ``migrations/``; these
table objects are the code's typed view of it. Each later stage adds its own tables in its own
module and migration.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

crawl_runs = sa.Table(
    "crawl_runs",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    # The orchestrator's id for this run (Airflow run_id) so that a retried task reuses its run row.
    sa.Column("run_key", sa.Text, nullable=False, unique=True),
    sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.Text, nullable=False, server_default="running"),
    sa.Column("shop_base_url", sa.Text, nullable=False),
    sa.Column("settings", JSONB, nullable=False, server_default="{}"),
    sa.Column("stats", JSONB, nullable=False, server_default="{}"),
)

categories = sa.Table(
    "categories",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text),
    sa.Column("source_url", sa.Text),
    sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    sa.Column("last_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
)

products = sa.Table(
    "products",
    metadata,
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
    # Run that last walked every review page of this product to the end; incremental crawls stop
    # paging at reviews already known at that point.
    sa.Column("reviews_synced_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
)

# Rank history: one row per run and product, so "rank per night" is a query, not a guess.
product_ranks = sa.Table(
    "product_ranks",
    metadata,
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), primary_key=True),
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), primary_key=True),
    sa.Column("category_id", sa.Text, sa.ForeignKey("categories.id"), nullable=False),
    sa.Column("rank", sa.Integer, nullable=False),
    sa.Column("review_count", sa.Integer),
    sa.Column("rating", sa.Float),
    sa.Column("source_url", sa.Text, nullable=False),
)

reviews = sa.Table(
    "reviews",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True),
    sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False),
    sa.Column("created_date", sa.Date),
    sa.Column("stars", sa.Float),
    sa.Column("comment", sa.Text),
    sa.Column("writer_nickname", sa.Text),
    sa.Column("photo_url", sa.Text),  # NULL for reviews without a photo
    sa.Column("source_url", sa.Text, nullable=False),  # the reviews API page it came from
    sa.Column("first_seen_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
)

images = sa.Table(
    "images",
    metadata,
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
)

# A review photo whose bytes equal an already stored image (the same photo posted twice) keeps
# its own link here; the image row names the first review that brought the bytes.
review_photos = sa.Table(
    "review_photos",
    metadata,
    sa.Column("review_id", sa.BigInteger, sa.ForeignKey("reviews.id"), primary_key=True),
    sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
)

crawl_failures = sa.Table(
    "crawl_failures",
    metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
    sa.Column("category_id", sa.Text),
    sa.Column("product_id", sa.BigInteger),
    sa.Column("review_id", sa.BigInteger),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("stage", sa.Text, nullable=False),  # ranking | product | reviews | image | browser
    sa.Column("reason", sa.Text, nullable=False),  # short machine-readable code, e.g. http_500
    sa.Column("detail", sa.Text),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
)

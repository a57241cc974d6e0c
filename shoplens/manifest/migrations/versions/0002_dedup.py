"""Dedup stage: perceptual hashes and near-duplicate clusters.

Revision ID: 0002_dedup
Revises: 0001_crawl
"""
from alembic import op
import sqlalchemy as sa

revision = "0002_dedup"
down_revision = "0001_crawl"
branch_labels = None
depends_on = None

REVIEW_VIEW = """
CREATE VIEW duplicate_clusters_for_review AS
SELECT d.cluster_id,
       array_agg(DISTINCT i.product_id ORDER BY i.product_id) AS products,
       array_agg(d.sha256 ORDER BY d.sha256) AS members
FROM image_dedup d
JOIN images i ON i.sha256 = d.sha256
WHERE d.spans_products
GROUP BY d.cluster_id
"""


def upgrade() -> None:
    op.create_table(
        "image_hashes",
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
        # 64-bit hashes as the signed BIGINT with the same bits (two's complement).
        sa.Column("phash", sa.BigInteger, nullable=False),
        sa.Column("dhash", sa.BigInteger, nullable=False),
        sa.Column("hash_version", sa.Text, nullable=False),
        sa.Column("computed_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "image_dedup",
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
        # The representative's sha256; a singleton is its own cluster.
        sa.Column("cluster_id", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
        # NULL for representatives and singletons.
        sa.Column("duplicate_of", sa.CHAR(64), sa.ForeignKey("images.sha256")),
        # pHash + dHash Hamming distance to the representative.
        sa.Column("distance", sa.Integer),
        sa.Column("threshold", sa.Integer, nullable=False),
        sa.Column("spans_products", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("(duplicate_of IS NULL) = (distance IS NULL)", name="image_dedup_distance_iff_duplicate"),
        sa.CheckConstraint("duplicate_of IS NULL OR duplicate_of = cluster_id", name="image_dedup_points_to_representative"),
    )
    op.create_index("image_dedup_cluster", "image_dedup", ["cluster_id"])
    op.create_index("image_dedup_spans_products", "image_dedup", ["cluster_id"],
                    postgresql_where=sa.text("spans_products"))
    op.execute(REVIEW_VIEW)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS duplicate_clusters_for_review")
    op.drop_table("image_dedup")
    op.drop_table("image_hashes")

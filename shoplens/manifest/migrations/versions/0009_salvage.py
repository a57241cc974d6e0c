"""Salvage: crops of multi-product review photos that enter the dataset like kept photos.

Revision ID: 0009_salvage
Revises: 0008_dedup_embeddings

- ``salvaged_crops``: one row per photo the filter's salvage looked at (rejected as
  multi-product); ``sha256`` is set when one of its boxes was salvaged, naming the crop's JPEG
  stored content-addressed (``object_key``) with its lineage: parent photo, detector box, crop
  rectangle, class, scores, product, review, filter run.
- ``kept_images`` also lists the salvaged crops (same columns; the crop's ``cluster_id`` is its
  parent's near-duplicate cluster, so a crop never lands in another split than its parent's
  duplicates), unless an override rejects the crop or the parent photo itself is kept.
- ``image_overrides.sha256`` and ``dataset_members.sha256`` may name a crop, so their foreign keys
  to ``images`` are dropped (``shoplens override`` checks that the sha256 is an image or a crop;
  the build's check ``every_member_has_its_image_row`` checks members against both).
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0009_salvage"
down_revision = "0008_dedup_embeddings"
branch_labels = None
depends_on = None

KEPT_IMAGES_0003 = """
CREATE VIEW kept_images AS
SELECT i.*, d.cluster_id
FROM images i
JOIN image_verdicts v ON v.sha256 = i.sha256 AND v.verdict = 'keep'
JOIN image_dedup d ON d.sha256 = i.sha256 AND d.duplicate_of IS NULL
"""

KEPT_IMAGES = """
CREATE VIEW kept_images AS
SELECT i.*, d.cluster_id
FROM images i
JOIN image_verdicts v ON v.sha256 = i.sha256 AND v.verdict = 'keep'
JOIN image_dedup d ON d.sha256 = i.sha256 AND d.duplicate_of IS NULL
UNION ALL
SELECT c.sha256, c.object_key, c.size_bytes, c.width, c.height, 'jpeg'::text AS format,
       c.source_url, c.review_id, c.product_id, p.first_seen_run, c.created_at, d.cluster_id
FROM salvaged_crops c
JOIN images p ON p.sha256 = c.parent_sha256
JOIN image_dedup d ON d.sha256 = c.parent_sha256 AND d.duplicate_of IS NULL
LEFT JOIN image_overrides o ON o.sha256 = c.sha256
LEFT JOIN image_verdicts pv ON pv.sha256 = c.parent_sha256
WHERE c.sha256 IS NOT NULL
  AND COALESCE(o.verdict, 'keep') = 'keep'
  AND COALESCE(pv.verdict, 'reject') = 'reject'
"""


def upgrade() -> None:
    op.create_table(
        "salvaged_crops",
        sa.Column("parent_sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("filter_runs.id"), nullable=False),
        # salvaged | no_match (best crop below the threshold) | ambiguous (another product in
        # view matches as well) | no_box (no box of a salvage class big enough)
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False),
        sa.Column("review_id", sa.BigInteger, sa.ForeignKey("reviews.id"), nullable=False),
        sa.Column("detector_version", sa.Text, nullable=False),
        sa.Column("embedding_model", sa.Text),  # NULL: the untrained baseline
        sa.Column("threshold", sa.Float, nullable=False),
        sa.Column("best_score", sa.Float),
        sa.Column("runner_up_score", sa.Float),
        sa.Column("reference_photos", sa.Integer, nullable=False),
        sa.Column("label", sa.Text),
        sa.Column("detector_score", sa.Float),
        sa.Column("box", JSONB),
        sa.Column("crop_box", JSONB),
        sa.Column("sha256", sa.CHAR(64), unique=True),
        sa.Column("object_key", sa.Text, unique=True),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("width", sa.Integer),
        sa.Column("height", sa.Integer),
        sa.Column("source_url", sa.Text),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.CheckConstraint("outcome IN ('salvaged', 'no_match', 'ambiguous', 'no_box')",
                           name="salvaged_crops_outcome"),
        sa.CheckConstraint("(outcome = 'salvaged') = (sha256 IS NOT NULL)",
                           name="salvaged_crops_sha256_iff_salvaged"),
        sa.CheckConstraint("sha256 IS NULL OR (object_key IS NOT NULL AND box IS NOT NULL AND "
                           "crop_box IS NOT NULL AND width > 0 AND height > 0 AND size_bytes > 0 "
                           "AND source_url IS NOT NULL)", name="salvaged_crops_complete"),
    )
    op.create_index("salvaged_crops_run", "salvaged_crops", ["run_id"])
    op.drop_constraint("image_overrides_sha256_fkey", "image_overrides", type_="foreignkey")
    op.drop_constraint("dataset_members_sha256_fkey", "dataset_members", type_="foreignkey")
    op.execute("DROP VIEW IF EXISTS kept_images")
    op.execute(KEPT_IMAGES)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS kept_images")
    op.execute(KEPT_IMAGES_0003)
    op.execute("DELETE FROM image_overrides o WHERE NOT EXISTS "
               "(SELECT 1 FROM images i WHERE i.sha256 = o.sha256)")
    op.create_foreign_key("image_overrides_sha256_fkey", "image_overrides", "images",
                          ["sha256"], ["sha256"])
    op.create_foreign_key("dataset_members_sha256_fkey", "dataset_members", "images",
                          ["sha256"], ["sha256"])
    op.drop_index("salvaged_crops_run", table_name="salvaged_crops")
    op.drop_table("salvaged_crops")

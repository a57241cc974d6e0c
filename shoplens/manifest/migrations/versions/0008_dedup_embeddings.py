"""Dedup's second signal: one photo embedding per image (near-duplicates that hashes miss).

Revision ID: 0008_dedup_embeddings
Revises: 0007_search
"""
from alembic import op
import sqlalchemy as sa

revision = "0008_dedup_embeddings"
down_revision = "0007_search"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Written by the dedup hash batch in the same transaction as the image's hashes (one decode);
    # vectors of another embedding_version are recomputed, like hashes of another hash_version.
    op.create_table(
        "image_embeddings",
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
        sa.Column("embedding_version", sa.Text, nullable=False),
        sa.Column("dim", sa.Integer, nullable=False),
        sa.Column("vector", sa.LargeBinary, nullable=False),  # dim little-endian float16, unit length
        sa.Column("computed_run", sa.BigInteger, sa.ForeignKey("crawl_runs.id")),
        sa.Column("computed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("octet_length(vector) = 2 * dim", name="image_embeddings_vector_size"),
    )
    # The rule a cluster row was decided under, beyond the hash threshold: the embedding rule and
    # version (NULL: hashes only). A change re-clusters everything, as a changed threshold does.
    op.add_column("image_dedup", sa.Column("embedding_rule", sa.Text))


def downgrade() -> None:
    op.drop_column("image_dedup", "embedding_rule")
    op.drop_table("image_embeddings")

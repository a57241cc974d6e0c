"""Dedup's geometric check: a small grayscale thumbnail per embedded image.

Revision ID: 0010_dedup_thumbnails
Revises: 0009_salvage

The embedding's candidate pairs (crops the hashes miss) are confirmed by aligning the two photos'
thumbnails (``dataset/dedup/alignment.py``): a crop is the same pixels re-framed, another shot of
the product is not. Written with the vector by the same hash batch; NULL for rows of an older
embedding version (they are recomputed, the version names the thumbnail scheme).
"""
from alembic import op
import sqlalchemy as sa

revision = "0010_dedup_thumbnails"
down_revision = "0009_salvage"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("image_embeddings", sa.Column("thumbnail", sa.LargeBinary))  # side x side uint8, row-major


def downgrade() -> None:
    op.drop_column("image_embeddings", "thumbnail")

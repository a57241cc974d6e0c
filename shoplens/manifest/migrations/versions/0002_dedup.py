"""Dedup stage: perceptual hashes and near-duplicate clusters.

Revision ID: 0002_dedup
Revises: 0001_crawl
"""
from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401

revision = "0002_dedup"
down_revision = "0001_crawl"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the stage that owns this migration


def downgrade() -> None:
    pass

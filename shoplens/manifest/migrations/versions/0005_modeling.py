"""Modeling: trained models, metrics, promotion.

Revision ID: 0005_modeling
Revises: 0004_dataset
"""
from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401

revision = "0005_modeling"
down_revision = "0004_dataset"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the stage that owns this migration


def downgrade() -> None:
    pass

"""Filter stage: detections, rule decisions, human overrides, kept_images view.

Revision ID: 0003_filter
Revises: 0002_dedup
"""
from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401

revision = "0003_filter"
down_revision = "0002_dedup"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the stage that owns this migration


def downgrade() -> None:
    pass

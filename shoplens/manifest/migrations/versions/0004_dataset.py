"""Dataset build: label map, versions, members, splits, data-engineer views.

Revision ID: 0004_dataset
Revises: 0003_filter
"""
from alembic import op  # noqa: F401
import sqlalchemy as sa  # noqa: F401

revision = "0004_dataset"
down_revision = "0003_filter"
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass  # filled in by the stage that owns this migration


def downgrade() -> None:
    pass

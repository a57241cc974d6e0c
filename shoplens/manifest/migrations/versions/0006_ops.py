"""Operations: per-run duration and data-volume metrics (one row per run and stage).

Revision ID: 0006_ops
Revises: 0005_modeling
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0006_ops"
down_revision = "0005_modeling"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_metrics",
        # The orchestrator's run id (Airflow run_id), the same key the stages get as run_key.
        sa.Column("run_key", sa.Text, primary_key=True),
        # A pipeline stage (crawl, dedup, filter, build, train, ...) or 'run' for the whole night.
        sa.Column("stage", sa.Text, primary_key=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("duration_seconds", sa.Float, nullable=False),
        # Numeric counters the stage reported (images stored, bytes, rejected, ...): data volume.
        sa.Column("volume", JSONB, nullable=False, server_default="{}"),
        # Anything else the stage returned, or the failure message.
        sa.Column("detail", JSONB, nullable=False, server_default="{}"),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.CheckConstraint("status IN ('success', 'failed')", name="run_metrics_status"),
        sa.CheckConstraint("duration_seconds >= 0", name="run_metrics_duration"),
    )
    op.create_index("run_metrics_recorded_at", "run_metrics", ["recorded_at"])


def downgrade() -> None:
    op.drop_index("run_metrics_recorded_at", table_name="run_metrics")
    op.drop_table("run_metrics")

"""Modeling: trained models, metrics, promotion.

Revision ID: 0005_modeling
Revises: 0004_dataset
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005_modeling"
down_revision = "0004_dataset"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # One row per training run; the row exists from the start so that a crash leaves 'failed'.
    op.create_table(
        "models",
        sa.Column("id", sa.Text, primary_key=True),
        # Not a foreign key: a model can also be trained from a local dataset folder (benchmarks).
        sa.Column("dataset_version", sa.Text, nullable=False),
        sa.Column("profile", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="training"),
        sa.Column("promoted", sa.Boolean, nullable=False, server_default=sa.false()),
        # Why it was (not) promoted, in words, e.g. "Top-1 0.812 < current 0.845 - margin 0.0".
        sa.Column("reason", sa.Text),
        sa.Column("artifact_prefix", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("config", JSONB, nullable=False, server_default="{}"),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("status IN ('training', 'complete', 'failed')", name="models_status"),
    )
    op.create_index("models_dataset_version", "models", ["dataset_version"])
    # Scores of a model (each member and the ensemble) on one dataset version's split. A current
    # model re-evaluated on a newer version's test split gets rows for that version too.
    op.create_table(
        "model_metrics",
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("dataset_version", sa.Text, primary_key=True),
        sa.Column("split", sa.Text, primary_key=True),
        sa.Column("member", sa.Text, primary_key=True),  # architecture name or 'ensemble'
        sa.Column("top1", sa.Float, nullable=False),
        sa.Column("top3", sa.Float, nullable=False),
        sa.Column("n", sa.Integer, nullable=False),
        sa.Column("tta", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("split IN ('train', 'val', 'test')", name="model_metrics_split"),
        sa.CheckConstraint("top1 BETWEEN 0 AND 1 AND top3 BETWEEN 0 AND 1", name="model_metrics_range"),
    )
    # Promotion history; the latest row names the current model.
    op.create_table(
        "model_promotions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.id"), nullable=False),
        sa.Column("previous_model_id", sa.Text, sa.ForeignKey("models.id")),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.execute("""
        CREATE VIEW current_model AS
        SELECT m.*, p.promoted_at
        FROM model_promotions p JOIN models m ON m.id = p.model_id
        ORDER BY p.id DESC LIMIT 1
    """)
    # Ensemble test scores of every model, for comparing runs at a glance.
    op.execute("""
        CREATE VIEW model_scoreboard AS
        SELECT m.id AS model_id, m.dataset_version AS trained_on, m.profile, m.status, m.promoted,
               m.reason, mm.dataset_version AS evaluated_on, mm.top1, mm.top3, mm.n, m.created_at
        FROM models m JOIN model_metrics mm ON mm.model_id = m.id
        WHERE mm.member = 'ensemble' AND mm.split = 'test'
    """)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS model_scoreboard")
    op.execute("DROP VIEW IF EXISTS current_model")
    op.drop_table("model_promotions")
    op.drop_table("model_metrics")
    op.drop_table("models")

"""Filter stage: detections, rule decisions, human overrides, kept_images view.

Revision ID: 0003_filter
Revises: 0002_dedup
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0003_filter"
down_revision = "0002_dedup"
branch_labels = None
depends_on = None

IMAGE_VERDICTS = """
CREATE VIEW image_verdicts AS
WITH latest AS (
    SELECT DISTINCT ON (sha256, rule) sha256, rule, passed
    FROM rule_decisions
    ORDER BY sha256, rule, run_id DESC, id DESC
), automatic AS (
    SELECT sha256,
           COALESCE(array_agg(rule ORDER BY rule) FILTER (WHERE NOT passed), '{}') AS reasons
    FROM latest GROUP BY sha256
)
SELECT COALESCE(o.sha256, a.sha256) AS sha256,
       CASE WHEN o.sha256 IS NOT NULL THEN o.verdict
            WHEN cardinality(a.reasons) > 0 THEN 'reject' ELSE 'keep' END AS verdict,
       CASE WHEN o.sha256 IS NOT NULL THEN ARRAY['override: ' || o.reason]
            ELSE a.reasons END AS reasons,
       o.sha256 IS NOT NULL AS overridden
FROM automatic a FULL OUTER JOIN image_overrides o ON o.sha256 = a.sha256
"""

KEPT_IMAGES = """
CREATE VIEW kept_images AS
SELECT i.*, d.cluster_id
FROM images i
JOIN image_verdicts v ON v.sha256 = i.sha256 AND v.verdict = 'keep'
JOIN image_dedup d ON d.sha256 = i.sha256 AND d.duplicate_of IS NULL
"""


def upgrade() -> None:
    op.create_table(
        "filter_runs",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("run_key", sa.Text, nullable=False, unique=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("status", sa.Text, nullable=False, server_default="running"),
        sa.Column("detector_version", sa.Text, nullable=False),
        sa.Column("rule_version", sa.Text, nullable=False),
        sa.Column("params", JSONB, nullable=False, server_default="{}"),
        sa.Column("stats", JSONB, nullable=False, server_default="{}"),
        sa.CheckConstraint("status IN ('running', 'success', 'failed')", name="filter_runs_status"),
    )
    op.create_table(
        "detections",
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
        sa.Column("detector_version", sa.Text, primary_key=True),
        sa.Column("features_version", sa.Text, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("boxes", JSONB, nullable=False),
        sa.Column("stats", JSONB, nullable=False),
        sa.Column("min_score", sa.Float, nullable=False),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("filter_runs.id"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    )
    op.create_table(
        "rule_decisions",
        sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), nullable=False),
        sa.Column("rule", sa.Text, nullable=False),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("filter_runs.id"), nullable=False),
        sa.Column("passed", sa.Boolean, nullable=False),
        sa.Column("score", sa.Float),
        sa.Column("reason", sa.Text),
        sa.Column("rule_version", sa.Text, nullable=False),
        sa.Column("detector_version", sa.Text, nullable=False),
        sa.Column("params", JSONB, nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.UniqueConstraint("sha256", "rule", "run_id", name="rule_decisions_once_per_run"),
    )
    op.create_index("rule_decisions_latest", "rule_decisions", ["sha256", "rule", "run_id"])
    op.create_table(
        "image_overrides",
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
        sa.Column("verdict", sa.Text, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("created_by", sa.Text, nullable=False, server_default=sa.text("current_user")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.CheckConstraint("verdict IN ('keep', 'reject')", name="image_overrides_verdict"),
        sa.CheckConstraint("length(btrim(reason)) > 0", name="image_overrides_reason"),
    )
    op.execute(IMAGE_VERDICTS)
    op.execute(KEPT_IMAGES)  # needs 0002_dedup's image_dedup


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS kept_images")
    op.execute("DROP VIEW IF EXISTS image_verdicts")
    for table in ("image_overrides", "rule_decisions", "detections", "filter_runs"):
        op.drop_table(table)

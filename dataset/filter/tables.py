"""SQLAlchemy Core view of the filter stage's tables (schema: migration 0003_filter)."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

filter_runs = sa.Table(
    "filter_runs", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("run_key", sa.Text, nullable=False, unique=True),
    sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.Column("status", sa.Text, nullable=False, server_default="running"),
    sa.Column("detector_version", sa.Text, nullable=False),
    sa.Column("rule_version", sa.Text, nullable=False),
    sa.Column("params", JSONB, nullable=False),
    sa.Column("stats", JSONB, nullable=False),
)

# Raw detections (every box >= min_score) and image statistics, once per image and detector.
detections = sa.Table(
    "detections", metadata,
    sa.Column("sha256", sa.CHAR(64), primary_key=True),
    sa.Column("detector_version", sa.Text, primary_key=True),
    sa.Column("features_version", sa.Text, nullable=False),
    sa.Column("width", sa.Integer, nullable=False),
    sa.Column("height", sa.Integer, nullable=False),
    sa.Column("boxes", JSONB, nullable=False),
    sa.Column("stats", JSONB, nullable=False),
    sa.Column("min_score", sa.Float, nullable=False),
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)

# Decision history: one row per image, rule and run that decided it.
rule_decisions = sa.Table(
    "rule_decisions", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("sha256", sa.CHAR(64), nullable=False),
    sa.Column("rule", sa.Text, nullable=False),
    sa.Column("run_id", sa.BigInteger, nullable=False),
    sa.Column("passed", sa.Boolean, nullable=False),
    sa.Column("score", sa.Float),
    sa.Column("reason", sa.Text),
    sa.Column("rule_version", sa.Text, nullable=False),
    sa.Column("detector_version", sa.Text, nullable=False),
    sa.Column("params", JSONB, nullable=False),
    sa.Column("decided_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)

image_overrides = sa.Table(
    "image_overrides", metadata,
    sa.Column("sha256", sa.CHAR(64), primary_key=True),
    sa.Column("verdict", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("created_by", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.func.now()),
)

image_verdicts = sa.Table(
    "image_verdicts", metadata,
    sa.Column("sha256", sa.CHAR(64)),
    sa.Column("verdict", sa.Text),
    sa.Column("reasons", sa.ARRAY(sa.Text)),
    sa.Column("overridden", sa.Boolean),
)

"""SQLAlchemy Core view of the modeling tables (created by migration 0005_modeling)."""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

metadata = sa.MetaData()

models = sa.Table(
    "models", metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("dataset_version", sa.Text, nullable=False),
    sa.Column("profile", sa.Text, nullable=False),
    sa.Column("status", sa.Text, nullable=False),
    sa.Column("promoted", sa.Boolean, nullable=False),
    sa.Column("reason", sa.Text),
    sa.Column("artifact_prefix", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True)),
    sa.Column("completed_at", sa.DateTime(timezone=True)),
    sa.Column("config", JSONB, nullable=False),
    sa.Column("error", sa.Text),
)

model_metrics = sa.Table(
    "model_metrics", metadata,
    sa.Column("model_id", sa.Text, primary_key=True),
    sa.Column("dataset_version", sa.Text, primary_key=True),
    sa.Column("split", sa.Text, primary_key=True),
    sa.Column("member", sa.Text, primary_key=True),
    sa.Column("top1", sa.Float, nullable=False),
    sa.Column("top3", sa.Float, nullable=False),
    sa.Column("n", sa.Integer, nullable=False),
    sa.Column("tta", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True)),
)

model_promotions = sa.Table(
    "model_promotions", metadata,
    sa.Column("id", sa.BigInteger, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.Text, nullable=False),
    sa.Column("previous_model_id", sa.Text),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("promoted_at", sa.DateTime(timezone=True)),
)

current_model = sa.Table(
    "current_model", metadata,
    sa.Column("id", sa.Text), sa.Column("dataset_version", sa.Text),
    sa.Column("artifact_prefix", sa.Text), sa.Column("promoted_at", sa.DateTime(timezone=True)),
)

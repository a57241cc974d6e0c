"""Search: products' catalogue images, embedding models in the registry, versioned search indexes.

Revision ID: 0007_search
Revises: 0006_ops
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0007_search"
down_revision = "0006_ops"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The shop's own image of each product (originalImageUrl): makes a product searchable before
    # any review photo of it is kept. Bytes live content-addressed in the object store like review
    # photos (images/<sha256>); this row is their provenance.
    op.create_table(
        "catalogue_images",
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), primary_key=True),
        sa.Column("sha256", sa.CHAR(64), nullable=False),
        sa.Column("object_key", sa.Text, nullable=False),
        sa.Column("source_url", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.Column("run_id", sa.BigInteger, sa.ForeignKey("crawl_runs.id"), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.CheckConstraint("sha256 ~ '^[0-9a-f]{64}$'", name="catalogue_images_sha256_hex"),
        sa.CheckConstraint("width > 0 AND height > 0 AND size_bytes > 0",
                           name="catalogue_images_positive"),
    )
    op.create_index("catalogue_images_sha256", "catalogue_images", ["sha256"])

    # The registry holds two kinds of model: the closed-set ensemble and the search embedding.
    # Each kind has its own current (promoted) model.
    op.add_column("models", sa.Column("kind", sa.Text, nullable=False,
                                      server_default="ensemble"))
    op.create_check_constraint("models_kind", "models", "kind IN ('ensemble', 'embedding')")
    op.execute("DROP VIEW IF EXISTS model_scoreboard")
    op.execute("DROP VIEW IF EXISTS current_model")
    op.execute("""
        CREATE VIEW current_model AS
        SELECT m.*, p.promoted_at
        FROM model_promotions p JOIN models m ON m.id = p.model_id
        WHERE m.kind = 'ensemble'
        ORDER BY p.id DESC LIMIT 1
    """)
    op.execute("""
        CREATE VIEW current_embedding AS
        SELECT m.*, p.promoted_at
        FROM model_promotions p JOIN models m ON m.id = p.model_id
        WHERE m.kind = 'embedding'
        ORDER BY p.id DESC LIMIT 1
    """)
    op.execute("""
        CREATE VIEW model_scoreboard AS
        SELECT m.id AS model_id, m.dataset_version AS trained_on, m.profile, m.status, m.promoted,
               m.reason, mm.dataset_version AS evaluated_on, mm.top1, mm.top3, mm.n, m.created_at
        FROM models m JOIN model_metrics mm ON mm.model_id = m.id
        WHERE mm.member = 'ensemble' AND mm.split = 'test' AND m.kind = 'ensemble'
    """)

    # One row per built search index (a full build or an incremental refresh of its parent); the
    # row exists from the start so that a crash leaves 'failed' or 'building', never a half index
    # marked complete. The artifact (vectors, ANN, products) is under artifact_prefix.
    op.create_table(
        "search_indexes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("parent_id", sa.Text, sa.ForeignKey("search_indexes.id")),
        # The embedding model it was built with (NULL: the untrained ImageNet baseline).
        sa.Column("model_id", sa.Text, sa.ForeignKey("models.id")),
        sa.Column("embedding", JSONB, nullable=False, server_default="{}"),
        # The dataset version whose kept photos it covers, when built from one.
        sa.Column("dataset_version", sa.Text),
        sa.Column("status", sa.Text, nullable=False, server_default="building"),
        sa.Column("products", sa.Integer, nullable=False, server_default="0"),
        sa.Column("vectors", sa.Integer, nullable=False, server_default="0"),
        sa.Column("added_vectors", sa.Integer, nullable=False, server_default="0"),
        sa.Column("threshold", sa.Float),
        sa.Column("artifact_prefix", sa.Text, nullable=False),
        sa.Column("run_key", sa.Text),
        sa.Column("built_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("status IN ('building', 'complete', 'failed')",
                           name="search_indexes_status"),
    )
    op.create_index("search_indexes_completed_at", "search_indexes", ["completed_at"])
    op.execute("""
        CREATE VIEW current_search_index AS
        SELECT * FROM search_indexes WHERE status = 'complete'
        ORDER BY completed_at DESC, id DESC LIMIT 1
    """)


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS current_search_index")
    op.drop_index("search_indexes_completed_at", table_name="search_indexes")
    op.drop_table("search_indexes")
    op.execute("DROP VIEW IF EXISTS model_scoreboard")
    op.execute("DROP VIEW IF EXISTS current_embedding")
    op.execute("DROP VIEW IF EXISTS current_model")
    op.drop_constraint("models_kind", "models")
    op.drop_column("models", "kind")
    op.execute("""
        CREATE VIEW current_model AS
        SELECT m.*, p.promoted_at
        FROM model_promotions p JOIN models m ON m.id = p.model_id
        ORDER BY p.id DESC LIMIT 1
    """)
    op.execute("""
        CREATE VIEW model_scoreboard AS
        SELECT m.id AS model_id, m.dataset_version AS trained_on, m.profile, m.status, m.promoted,
               m.reason, mm.dataset_version AS evaluated_on, mm.top1, mm.top3, mm.n, m.created_at
        FROM models m JOIN model_metrics mm ON mm.model_id = m.id
        WHERE mm.member = 'ensemble' AND mm.split = 'test'
    """)
    op.drop_index("catalogue_images_sha256", table_name="catalogue_images")
    op.drop_table("catalogue_images")

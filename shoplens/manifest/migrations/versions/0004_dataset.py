"""Dataset build: label map, versions, members, splits, data-engineer views.

Revision ID: 0004_dataset
Revises: 0003_filter
"""
from alembic import op
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB

revision = "0004_dataset"
down_revision = "0003_filter"
branch_labels = None
depends_on = None

SPLITS = "('train', 'val', 'test')"

VIEWS = {
    # One row per version and label: how many photos each product contributes to each split.
    "dataset_version_label_counts": """
        SELECT m.version_id, m.label, m.product_id,
               min(m.product_name) AS product_name, min(m.category_id) AS category_id,
               count(*) AS images,
               count(*) FILTER (WHERE m.split = 'train') AS train_images,
               count(*) FILTER (WHERE m.split = 'val') AS val_images,
               count(*) FILTER (WHERE m.split = 'test') AS test_images
        FROM dataset_members m
        GROUP BY m.version_id, m.label, m.product_id
    """,
    # One row per version (every status), with its split sizes.
    "dataset_version_summary": """
        SELECT v.version_id, v.seq, v.status, v.parent_version, v.created_at, v.content_hash,
               v.code_version, v.uri,
               count(m.sha256) AS images,
               count(DISTINCT m.label) AS labels,
               count(m.sha256) FILTER (WHERE m.split = 'train') AS train_images,
               count(m.sha256) FILTER (WHERE m.split = 'val') AS val_images,
               count(m.sha256) FILTER (WHERE m.split = 'test') AS test_images
        FROM dataset_versions v
        LEFT JOIN dataset_members m ON m.version_id = v.version_id
        GROUP BY v.version_id
    """,
    # What each version changed relative to its parent (first version: everything is added).
    "dataset_version_changes": """
        SELECT v.version_id, v.parent_version, d.sha256, d.change, d.old_label, d.new_label,
               d.old_split, d.new_split, d.product_id
        FROM dataset_versions v
        CROSS JOIN LATERAL (
            SELECT coalesce(cur.sha256, prev.sha256) AS sha256,
                   CASE WHEN prev.sha256 IS NULL THEN 'added'
                        WHEN cur.sha256 IS NULL THEN 'removed'
                        WHEN cur.label <> prev.label THEN 'relabelled'
                        ELSE 'moved' END AS change,
                   prev.label AS old_label, cur.label AS new_label,
                   prev.split AS old_split, cur.split AS new_split,
                   coalesce(cur.product_id, prev.product_id) AS product_id
            FROM (SELECT * FROM dataset_members WHERE version_id = v.version_id) cur
            FULL JOIN (SELECT * FROM dataset_members WHERE version_id = v.parent_version) prev
              ON prev.sha256 = cur.sha256
            WHERE cur.sha256 IS NULL OR prev.sha256 IS NULL
               OR cur.label <> prev.label OR cur.split <> prev.split
        ) d
    """,
    # Clusters of near-duplicates whose members sit in more than one split of a version.
    # A correct build leaves this empty; the build's data-quality checks assert it.
    "dataset_split_leakage": """
        SELECT m.version_id, m.cluster_id, array_agg(DISTINCT m.split ORDER BY m.split) AS splits,
               count(*) AS images
        FROM dataset_members m
        GROUP BY m.version_id, m.cluster_id
        HAVING count(DISTINCT m.split) > 1
    """,
    # Every member of every version with where it came from: URL, review, product, crawl run.
    "dataset_member_lineage": """
        SELECT m.version_id, m.sha256, m.split, m.label, m.product_id, m.product_name,
               m.category_id, m.cluster_id, m.object_key, m.source_url AS image_source_url,
               m.review_id, r.source_url AS review_source_url, r.created_date AS review_date,
               r.stars AS review_stars, m.crawl_run, cr.run_key AS crawl_run_key,
               cr.started_at AS crawl_started_at
        FROM dataset_members m
        LEFT JOIN reviews r ON r.id = m.review_id
        LEFT JOIN crawl_runs cr ON cr.id = m.crawl_run
    """,
    # The newest version that finished (its checks passed and its export is written).
    "dataset_latest_version": """
        SELECT * FROM dataset_versions
        WHERE status = 'complete'
        ORDER BY seq DESC
        LIMIT 1
    """,
}



def upgrade() -> None:
    # The stable label map: a product's label is assigned once and never changes or gets reused,
    # even after the product drops out of later versions.
    op.create_table(
        "label_map",
        sa.Column("label", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("product_id", sa.BigInteger, sa.ForeignKey("products.id"), nullable=False,
                  unique=True),
        sa.Column("first_version", sa.Text, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.CheckConstraint("label >= 0", name="label_map_label_nonnegative"),
    )
    op.create_table(
        "dataset_versions",
        sa.Column("version_id", sa.Text, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False, unique=True),
        sa.Column("parent_version", sa.Text, sa.ForeignKey("dataset_versions.version_id")),
        sa.Column("run_key", sa.Text, nullable=False),
        sa.Column("status", sa.Text, nullable=False, server_default="building"),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False,
                  server_default=sa.func.now()),
        sa.Column("completed_at", sa.DateTime(timezone=True)),
        sa.Column("code_version", sa.Text, nullable=False),
        # Rules and thresholds in force: build settings, dedup/filter settings and thresholds.
        sa.Column("params", JSONB, nullable=False, server_default="{}"),
        sa.Column("counts", JSONB, nullable=False, server_default="{}"),
        # Products left out for too few kept photos, with their counts: [{product_id, photos}].
        sa.Column("excluded_products", JSONB, nullable=False, server_default="[]"),
        sa.Column("content_hash", sa.CHAR(64), nullable=False),
        sa.Column("uri", sa.Text, nullable=False),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("version_id ~ '^v[0-9]{4,}$'", name="dataset_versions_id_format"),
        sa.CheckConstraint("status IN ('building', 'complete', 'failed')",
                           name="dataset_versions_status"),
    )
    op.create_index("dataset_versions_run_key", "dataset_versions", ["run_key"])
    # Members are a snapshot: provenance columns are copied at build time so that a version's
    # export can be re-materialised byte for byte even after products or images change later.
    op.create_table(
        "dataset_members",
        sa.Column("version_id", sa.Text,
                  sa.ForeignKey("dataset_versions.version_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("sha256", sa.CHAR(64), sa.ForeignKey("images.sha256"), primary_key=True),
        sa.Column("label", sa.Integer, sa.ForeignKey("label_map.label"), nullable=False),
        sa.Column("product_id", sa.BigInteger, nullable=False),
        sa.Column("split", sa.Text, nullable=False),
        sa.Column("cluster_id", sa.CHAR(64), nullable=False),
        sa.Column("object_key", sa.Text, nullable=False),
        sa.Column("product_name", sa.Text, nullable=False),
        sa.Column("category_id", sa.Text, nullable=False),
        sa.Column("review_id", sa.BigInteger, nullable=False),
        sa.Column("source_url", sa.Text, nullable=False),
        sa.Column("crawl_run", sa.BigInteger, nullable=False),
        sa.Column("width", sa.Integer, nullable=False),
        sa.Column("height", sa.Integer, nullable=False),
        sa.Column("format", sa.Text, nullable=False),
        sa.CheckConstraint(f"split IN {SPLITS}", name="dataset_members_split"),
    )
    op.create_index("dataset_members_sha256", "dataset_members", ["sha256"])
    op.create_index("dataset_members_version_split_label", "dataset_members",
                    ["version_id", "split", "label"])
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in reversed(list(VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for table in ("dataset_members", "dataset_versions", "label_map"):
        op.drop_table(table)

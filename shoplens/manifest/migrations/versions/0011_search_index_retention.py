"""Search index retention: old versions can be pruned.

Revision ID: 0011_search_index_retention
Revises: 0010_dedup_thumbnails

A nightly refresh adds one index version a night; ``modeling.catalogue_index.prune`` keeps the
newest ``search_keep_versions`` complete ones and deletes the others' objects. Their rows stay
(children name them as parent, and the history stays queryable) with status 'pruned'.
"""
from alembic import op

revision = "0011_search_index_retention"
down_revision = "0010_dedup_thumbnails"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("search_indexes_status", "search_indexes", type_="check")
    op.create_check_constraint("search_indexes_status", "search_indexes",
                               "status IN ('building', 'complete', 'failed', 'pruned')")


def downgrade() -> None:
    op.execute("UPDATE search_indexes SET status = 'failed', error = 'pruned' "
               "WHERE status = 'pruned'")
    op.drop_constraint("search_indexes_status", "search_indexes", type_="check")
    op.create_check_constraint("search_indexes_status", "search_indexes",
                               "status IN ('building', 'complete', 'failed')")

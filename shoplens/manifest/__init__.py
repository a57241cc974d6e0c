"""The PostgreSQL manifest: connection, schema migrations (Alembic) and table definitions."""
from shoplens.manifest.db import (  # noqa: F401
    ManifestNotMigrated, engine_for, ensure_database, require_migrated, session_scope, upgrade)

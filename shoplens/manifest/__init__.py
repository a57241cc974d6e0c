"""The PostgreSQL manifest: connection, schema migrations (Alembic) and table definitions."""
from shoplens.manifest.db import engine_for, ensure_database, upgrade, session_scope  # noqa: F401

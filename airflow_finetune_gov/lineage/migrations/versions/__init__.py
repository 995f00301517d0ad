"""Lineage store revisions, oldest first (alembic skips this file)."""

"""Alembic migrations of the lineage store (run by ``lineage.store.upgrade_schema``; no alembic.ini needed).

A new revision goes in ``versions/`` as ``NNNN_what.py`` with ``down_revision`` naming the previous one;
the model in ``lineage/store.py`` must describe the schema at head (a test compares them).
"""

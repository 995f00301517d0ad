"""Alembic environment of the lineage store.

``lineage.store.upgrade_schema`` builds the ``Config`` in code and passes its own connection (already in
a transaction that holds the chain lock) as ``config.attributes["connection"]``; the ``alembic`` command
line works too with ``-x url=...`` or ``sqlalchemy.url``. The version table has its own name, so the
governance database can also be Airflow's metadata database (whose ``alembic_version`` is Airflow's).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from airflow_finetune_gov.lineage.store import VERSION_TABLE, Base

config = context.config


def _url() -> str:
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url") or ""


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=_url(), target_metadata=Base.metadata, version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif config.attributes.get("connection") is not None:
    _run(config.attributes["connection"])
else:
    engine = create_engine(_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()

"""Helpers shared by the tests that drive the embedded stack (importable as ``support``: pytest puts
``tests/`` on ``sys.path``, see ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from airflow_finetune_gov.lineage.store import LineageStore
from airflow_finetune_gov.stack.client import AirflowClient
from airflow_finetune_gov.stack.manager import Stack


class StackView:
    """A running test stack seen from outside: Airflow users over REST, lineage, PostgreSQL."""

    def __init__(self, stack: Stack) -> None:
        state = stack.load()
        assert state is not None
        self.stack, self.state = stack, state

    def client(self, user: str) -> AirflowClient:
        return AirflowClient(self.state["airflow"]["url"], user, self.stack.airflow_password(user))

    def events(self, run_id: str, kind: str | None = None) -> list[Any]:
        return LineageStore(Path(self.state["governance_db_url_file"]).read_text()).events(run_id=run_id,
                                                                                          event_type=kind)

    def superuser(self, db: str = "postgres") -> psycopg.Connection:
        pw = Path(self.state["postgres"]["superuser_password_file"]).read_text()
        return psycopg.connect(host="127.0.0.1", port=self.state["postgres"]["port"], user="postgres",
                               password=pw, dbname=db, autocommit=True)

    def trigger(self, dag_id: str, **conf: str) -> str:
        """Trigger ``dag_id`` as ``requester`` (waiting until the DAG is parsed and unpaused)."""
        requester = self.client("requester")
        requester.wait_for_dag(dag_id)
        return requester.trigger(dag_id, conf)

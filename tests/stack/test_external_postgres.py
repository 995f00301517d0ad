"""`fgov stack up --postgres-url`: use an existing PostgreSQL server instead of the embedded one."""

from __future__ import annotations

import tempfile
from pathlib import Path

import psycopg
import pytest

from airflow_finetune_gov.stack import postgres
from airflow_finetune_gov.stack.manager import Stack, StackOptions
from airflow_finetune_gov.stack.procs import StackError, pick_free_port

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.stack


def test_stack_on_an_existing_server_provisions_it_and_leaves_it_running() -> None:
    root = Path(tempfile.mkdtemp(prefix="fgov-extpg-"))
    root.chmod(0o755)
    port = pick_free_port(set())
    server = postgres.start(_init(root / "pg"), port, root / "pg.log")
    stack = Stack(root / "state")
    try:
        url = f"postgresql://postgres:s3cret-admin@127.0.0.1:{port}/postgres"
        state = stack.up(StackOptions(state_dir=stack.dir, dags_folder=REPO / "dags", postgres_url=url,
                                      log=lambda *_: None))
        assert state["postgres"] == {**state["postgres"], "managed": False, "port": port}
        assert "postgres" not in [r.name for r in stack.records()]
        with psycopg.connect(url, autocommit=True) as conn:
            dbs = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
            assert {"airflow", "fgov_governance", "fgov_datasets"} <= dbs
        assert "s3cret-admin" not in (stack.dir / "stack.json").read_text()
    finally:
        stack.down(log=lambda *_: None)
    try:
        assert server.alive(), "stack down must not stop a server it did not start"
    finally:
        postgres.shutdown(server)


def _init(pgdata: Path) -> Path:
    postgres.initdb(pgdata, "s3cret-admin")
    return pgdata


def test_bad_postgres_url_is_refused_before_anything_starts(tmp_path) -> None:
    for url, message in (("mysql://x:y@h/db", "must look like postgresql://"),
                         ("postgresql://h:5432/postgres", "needs a user allowed to create roles")):
        with pytest.raises(StackError, match=message):
            Stack(tmp_path).up(StackOptions(state_dir=tmp_path, dags_folder=REPO / "dags", postgres_url=url,
                                            log=lambda *_: None))
    assert Stack(tmp_path).records() == []

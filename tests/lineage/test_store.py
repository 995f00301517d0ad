"""Hash-chain logic on SQLite (pure logic); the append-only role is tested on PostgreSQL in integration."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from airflow_finetune_gov.lineage.store import Base, EventKey, LineageError, LineageStore


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    return s


def fill(store: LineageStore) -> None:
    for run in ("r1", "r2"):
        for i, task in enumerate(("policy_check", "approval_gate", "tune")):
            store.record(EventKey("d", run, task, 1), f"e{i}", actor="x", payload={"n": i, "run": run})


def test_chain_links_each_event_to_its_run_and_the_global_tail(store: LineageStore) -> None:
    fill(store)
    events = store.events()
    assert [e.prev_hash for e in events[1:]] == [e.hash for e in events[:-1]]
    r2 = store.events(run_id="r2")
    assert r2[0].prev_run_hash is None
    assert r2[1].prev_run_hash == r2[0].hash
    result = store.verify()
    assert result.ok and result.checked == 6


def test_edited_row_is_named(store: LineageStore) -> None:
    fill(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE fgov_lineage_event SET actor = 'mallory' WHERE id = 3"))
    result = store.verify()
    assert not result.ok
    assert any(p.startswith("event 3 ") and "edited" in p for p in result.problems)


def test_deleted_row_breaks_both_chains(store: LineageStore) -> None:
    fill(store)
    with store.engine.begin() as conn:
        conn.execute(text("DELETE FROM fgov_lineage_event WHERE id = 2"))
    problems = store.verify().problems
    assert any(p.startswith("event 3 ") and "global chain" in p for p in problems)
    assert any(p.startswith("event 3 ") and "run chain" in p for p in problems)


def test_reordered_rows_are_detected(store: LineageStore) -> None:
    fill(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE fgov_lineage_event SET id = 100 WHERE id = 1"))
    assert not store.verify().ok


def test_secrets_are_refused(store: LineageStore) -> None:
    for payload in ({"password": "x"}, {"nested": {"db_password": "x"}}, {"items": [{"wrap_token": "t"}]}):
        with pytest.raises(LineageError, match="never stores secrets"):
            store.record(EventKey("d", "r", "t", 1), "e", actor="a", payload=payload)
    assert store.events() == []


def test_unreachable_database_is_a_lineage_error(tmp_path) -> None:
    s = LineageStore(f"sqlite:///{tmp_path / 'nope' / 'l.db'}")
    with pytest.raises(LineageError, match="could not write lineage event e for d/r"):
        s.record(EventKey("d", "r", "t", 1), "e", actor="a", payload={})

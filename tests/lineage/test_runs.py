"""`fgov runs list`: the runs with the newest events first, and --limit reading only their rows."""

from __future__ import annotations

import pytest

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    # a: 3 events, b: 2 (its last one newest of all), same run id "r" in two DAGs, c: 1; interleaved.
    for dag_id, run_id in [("d", "a"), ("d", "b"), ("d", "a"), ("d", "r"), ("e", "r"), ("d", "r"), ("d", "c"),
                           ("d", "a"), ("d", "b")]:
        s.record(EventKey(dag_id, run_id, "t", 1), "e", actor="x", payload={})
    return s


def test_runs_newest_event_first_with_counts(store: LineageStore) -> None:
    runs = store.runs()
    assert [(r["dag_id"], r["run_id"], r["events"]) for r in runs] == [
        ("d", "b", 2), ("d", "a", 3), ("d", "c", 1), ("d", "r", 2), ("e", "r", 1)]
    assert all(r["first"] <= r["last"] for r in runs)


@pytest.mark.parametrize("limit", [1, 2, 4, 5, 50])
def test_limit_is_the_head_of_the_full_list(store: LineageStore, limit: int) -> None:
    assert store.runs(limit=limit) == store.runs()[:limit]


def test_limit_pages_back_through_long_runs(store: LineageStore) -> None:
    for i in range(450):  # one run's events fill more than a page of the backward read
        store.record(EventKey("d", "long", "t", 1), "e", actor="x", payload={"i": i})
    store.record(EventKey("e", "r", "t", 1), "e", actor="x", payload={})
    assert [(r["dag_id"], r["run_id"], r["events"]) for r in store.runs(limit=3)] == [
        ("e", "r", 2), ("d", "long", 450), ("d", "b", 2)]


def test_cli_limit(store: LineageStore, capsys) -> None:
    url = str(store.engine.url)
    assert fgov(["runs", "list", "--limit", "2", "--db-url", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines] == [["d", "b"], ["d", "a"]]
    assert fgov(["runs", "list", "--limit", "0", "--json", "--db-url", url]) == 0
    assert capsys.readouterr().out.count('"run_id"') == 5

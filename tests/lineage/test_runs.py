"""`fgov runs list`: the runs with the newest events first, and --limit reading only their rows."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace

import pytest

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.lineage.runs import (
    RUN_STARTED,
    SCHEDULER_TASK_ID,
    RunNotWitnessed,
    incarnation_of,
    instant,
    newest,
    requested_by,
)
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore
from airflow_finetune_gov.plugin.listener import governed, witness


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


# -- incarnations: a run id deleted and triggered again is another run (airflow_finetune_gov.lineage.runs) --

def started(store: LineageStore, pk: int, start: str, run_id: str = "x") -> None:
    store.record(EventKey("d", run_id, SCHEDULER_TASK_ID, 0), RUN_STARTED, actor="scheduler",
                 payload={"dag_run_id": pk, "start_date": instant(start)})


def task_event(store: LineageStore, kind: str, run_id: str = "x") -> int:
    return store.record(EventKey("d", run_id, "policy_check", 1), kind, actor="t", payload={}).id


def test_a_recreated_run_id_starts_a_new_incarnation_and_a_clear_does_not(store: LineageStore) -> None:
    started(store, 7, "2026-12-01T10:00:00+00:00")
    old = task_event(store, "policy.decided")
    started(store, 7, "2026-12-01T11:00:00+00:00")  # the finished run cleared: same key, new start date
    cleared = task_event(store, "approval.granted")
    started(store, 9, "2026-12-01T12:00:00+00:00")  # deleted, then triggered again with the same run id
    new = task_event(store, "policy.decided")
    starts = store.events(run_id="x", event_type=RUN_STARTED)
    first = incarnation_of(starts, "2026-12-01T11:00:00Z", dag_id="d", run_id="x")
    assert first.dag_run_id == 7 and first.holds(old) and first.holds(cleared) and not first.holds(new)
    second = incarnation_of(starts, datetime(2026, 12, 1, 12, tzinfo=UTC), dag_id="d", run_id="x")
    assert second.dag_run_id == 9 and second.holds(new) and not second.holds(old)
    assert [e.id for e in newest(store.events(run_id="x"))] == [starts[-1].id, new]


def test_a_run_start_nobody_witnessed_decides_nothing(store: LineageStore) -> None:
    started(store, 7, "2026-12-01T10:00:00+00:00")
    starts = store.events(run_id="x", event_type=RUN_STARTED)
    # The same run id, started at another time (a re-created run whose run.started could not be written).
    with pytest.raises(RunNotWitnessed, match=r"has no run\.started record from the scheduler"):
        incarnation_of(starts, "2026-12-01T10:00:00.000001+00:00", dag_id="d", run_id="x")
    with pytest.raises(RunNotWitnessed):
        incarnation_of(starts, None, dag_id="d", run_id="x")
    with pytest.raises(RunNotWitnessed):
        incarnation_of([], "2026-12-01T10:00:00+00:00", dag_id="d", run_id="x")


def test_a_run_recorded_before_the_listener_existed_is_read_whole(store: LineageStore) -> None:
    ids = [task_event(store, "policy.decided", run_id="old"), task_event(store, "approval.granted", run_id="old")]
    assert [e.id for e in newest(store.events(run_id="old"))] == ids


def test_the_listener_records_airflows_key_and_start_of_the_run(store: LineageStore) -> None:
    run = SimpleNamespace(id=41, dag_id="d", run_id="x", start_date=datetime(2026, 12, 1, 10, 0, 0, 123, tzinfo=UTC),
                          clear_number=0, run_type="manual", triggering_user_name="requester", run_after=None)
    event = witness(run, store)
    assert event.event_type == RUN_STARTED and event.actor == "scheduler" and event.task_id == SCHEDULER_TASK_ID
    assert event.payload_dict()["dag_run_id"] == 41
    assert incarnation_of([event], run.start_date, dag_id="d", run_id="x").dag_run_id == 41


def test_the_listener_records_only_dags_with_a_governed_task() -> None:
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import DAG

    from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator

    with DAG("plain", schedule=None) as plain:
        EmptyOperator(task_id="a")
    with DAG("gov", schedule=None) as gov:
        FineTuneApprovalOperator(task_id="approval_gate")
    assert not governed(plain) and governed(gov) and governed(None)


def test_lineage_show_marks_each_run_under_one_run_id(store: LineageStore, capsys) -> None:
    started(store, 7, "2026-12-01T10:00:00+00:00")
    task_event(store, "policy.decided")
    started(store, 9, "2026-12-01T12:00:00+00:00")
    task_event(store, "policy.decided")
    url = str(store.engine.url)
    assert fgov(["lineage", "show", "x", "--db-url", url]) == 0
    out = capsys.readouterr().out
    assert "4 event(s), 2 runs under this run id (deleted and triggered again)" in out
    assert "-- run dag_run.id 7 (1 of 2): its governed tasks read only the events from here to the next run" in out
    assert "-- run dag_run.id 9 (2 of 2): its governed tasks read only the events from here\n" in out
    assert out.index("dag_run.id 7") < out.index("dag_run_id=7") < out.index("dag_run.id 9")


def test_the_requester_is_who_the_api_server_saw_trigger_the_newest_run(store: LineageStore) -> None:
    """``run.requested`` (the api-server's witness of the trigger) names the requester of the run that the
    next ``run.started`` starts; a re-created run id has its own."""
    from airflow_finetune_gov.lineage import events

    def requested(user: str) -> None:
        events.record(store, EventKey("d", "x", SCHEDULER_TASK_ID, 0), "run.requested", actor="api-server",
                      payload={"triggering_user_name": user, "run_type": "manual"})

    assert requested_by(store.events(run_id="x")) is None  # never triggered through the API
    requested("approver1")
    started(store, 1, "2026-01-01T00:00:00+00:00")
    assert requested_by(store.events(run_id="x")) == "approver1"
    requested("requester")  # the run deleted and triggered again by someone else
    started(store, 2, "2026-01-02T00:00:00+00:00")
    assert requested_by(store.events(run_id="x")) == "requester"

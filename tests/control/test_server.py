"""The control plane's own rules, on a real SQLite lineage store and a real unix socket (no Airflow stack):
who the caller is (the kernel's answer, matched to registered processes and their descendants), what a task
may append and read, and which OpenBao roles a run's recorded approval entitles it to. The same rules on the
real stack: tests/integration/test_dag_author_attacks.py and tests/reliability/test_boundary_probe.py."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import payloads
import pytest

from airflow_finetune_gov import common
from airflow_finetune_gov.control.client import ControlPlaneClient, ControlPlaneError
from airflow_finetune_gov.control.server import ControlError, ControlPlane, Registry, serve
from airflow_finetune_gov.credentials.identity import TaskIdentity
from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage.runs import RUN_STARTED, SCHEDULER_TASK_ID
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore

LEASE = TaskIdentity("d", "r", "acquire_lease", 1)


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    monkeypatch.setattr(common, "lineage_store", lambda: s)
    # no auth manager roles to read here: the packaged policy with its approvers named, not by role
    policy = tmp_path / "policy.yaml"
    policy.write_text(payloads.teamless_policy_text())
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__POLICY_FILE", str(policy))
    return s


def approved(store: LineageStore, *, witnessed: bool = True) -> dict:
    events.record(store, EventKey("d", "r", SCHEDULER_TASK_ID, 0), RUN_STARTED, actor="scheduler",
                  payload={"dag_run_id": 1, "start_date": "2026-12-01T00:00:00+00:00"})
    d = payloads.decision()
    events.record(store, EventKey("d", "r", "policy_check", 1), "policy.decided", actor="policy", payload=d)
    events.record(store, EventKey("d", "r", "approval_gate", 1), "approval.requested", actor="policy",
                  payload=payloads.requested(d))
    if witnessed:
        events.record(store, EventKey("d", "r", "approval_gate", 0), "approval.witnessed", actor="api-server",
                      payload=payloads.witnessed("approver1"))
    events.record(store, EventKey("d", "r", "approval_gate", 1), "approval.granted", actor="approver1",
                  payload=payloads.grant(d, "approver1", approval_id="a1"))
    return d


def test_a_registered_process_and_its_descendants_are_the_task_and_nothing_else() -> None:
    registry = Registry()
    registry.register(os.getpid(), "ti", LEASE)
    child = subprocess.Popen(["sleep", "5"])
    try:
        assert registry.task_of(os.getpid()).identity == LEASE
        assert registry.task_of(child.pid).identity == LEASE  # a task's own child process
        assert registry.task_of(1) is None  # init: nobody's task
        registry.deregister(os.getpid())
        assert registry.task_of(child.pid) is None
    finally:
        child.kill()
        child.wait()


def test_a_delegation_is_bound_to_its_task_and_expires() -> None:
    registry = Registry()
    token = registry.delegate(LEASE, 0.2)
    assert registry.delegated(token) == LEASE and registry.delegated(token + "x") is None
    time.sleep(0.3)
    assert registry.delegated(token) is None


def test_logins_follow_the_runs_witnessed_approval(store: LineageStore) -> None:
    approved(store)
    plane = ControlPlane(task_uid=os.getuid())
    plane._authorize_login(LEASE, "lease-benign", "lease", {"dataset": "benign", "approval_id": "a1"})
    plane._authorize_login(LEASE, "tune-benign", "tune", {"dataset": "benign"})
    plane._authorize_login(LEASE, "catalog", "catalog", {})
    for role, purpose, extra, why in (
            ("lease-benign", "lease", {"dataset": "benign", "approval_id": "forged"}, "approval is for dataset"),
            ("lease-poisoned", "lease", {"dataset": "poisoned", "approval_id": "a1"}, "approval is for dataset"),
            ("lease-benign", "tune", {"dataset": "benign", "approval_id": "a1"}, "approval is for dataset"),
            ("revoker", "revoke", {}, "revocation is the control plane's own"),
            ("provenance", "provenance", {}, "provenance is signed by the control plane"),
            ("endpoints", "endpoints", {}, "endpoints' keys are read by the control plane itself"),
            ("screen", "screen", {}, "the screen role reads training rows for the policy check's screening"),
            ("catalog", "catalog", {"dataset": "benign"}, "no claims")):
        with pytest.raises(ControlError, match=why):
            plane._authorize_login(LEASE, role, purpose, extra)


def test_an_unwitnessed_grant_entitles_to_nothing(store: LineageStore) -> None:
    approved(store, witnessed=False)
    with pytest.raises(ControlError, match="not witnessed by the api-server"):
        ControlPlane(task_uid=os.getuid())._authorize_login(LEASE, "lease-benign", "lease",
                                                            {"dataset": "benign", "approval_id": "a1"})


def test_a_task_appends_under_its_own_key_and_never_a_reserved_record(store: LineageStore) -> None:
    plane = ControlPlane(task_uid=os.getuid())
    for kind in ("approval.witnessed", "policy.decided", "run.started", "run.requested", "evaluation.completed",
                 "promotion.completed", "provenance.signed"):
        with pytest.raises(ControlError, match="never by a task"):
            plane.append(LEASE, {"event_type": kind, "payload": {}})
    with pytest.raises(ControlError, match="under its own key"):
        plane.append(LEASE, {"key": ["d", "r", "approval_gate", 1, -1], "event_type": "lease.none",
                             "payload": {"reason": "x"}})
    with pytest.raises(ControlError, match="missing"):
        plane.append(LEASE, {"event_type": "lease.none", "payload": {}})
    row = plane.append(LEASE, {"event_type": "lease.none", "payload": {"reason": "x"}, "actor": "lease-broker"})
    assert (row["task_id"], row["try_number"], row["event_type"]) == ("acquire_lease", 1, "lease.none")
    with pytest.raises(ControlError, match="its own run's lineage only"):
        plane.events(LEASE, {"run_id": "another"})
    assert [e["event_type"] for e in plane.events(LEASE, {})] == ["lease.none"]


def test_over_the_socket_the_kernel_names_the_caller(tmp_path: Path, store: LineageStore) -> None:
    sock = tmp_path / "control.sock"
    plane = ControlPlane(task_uid=os.getuid())
    ready = threading.Event()
    threading.Thread(target=serve, args=(sock, plane), kwargs={"ready": ready.set}, daemon=True).start()
    assert ready.wait(10)
    client = ControlPlaneClient(str(sock), timeout=10)
    with pytest.raises(ControlPlaneError, match=f"process {os.getpid()} .* is no task the executor started"):
        client.whoami()
    client.register(os.getpid(), {"dag_id": "d", "run_id": "r", "task_id": "acquire_lease", "try_number": 1})
    assert client.whoami() == {"dag_id": "d", "run_id": "r", "task_id": "acquire_lease", "try_number": 1,
                               "map_index": -1}
    # a child of the registered process (a connection of its own) is the same task
    code = (f"from airflow_finetune_gov.control.client import ControlPlaneClient as C\n"
            f"print(C({str(sock)!r}).whoami()['task_id'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "acquire_lease"
    client.deregister(os.getpid())
    with pytest.raises(ControlPlaneError, match="is no task"):  # on the same kept-alive connection: the caller
        client.whoami()                                          # named once is trusted only while registered
    client.register(os.getpid(), {"dag_id": "d", "run_id": "r2", "task_id": "tune", "try_number": 1})
    assert client.whoami()["run_id"] == "r2"


def test_a_call_from_a_signal_handler_during_a_call_gets_its_own_answer(tmp_path: Path, store: LineageStore,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A task's ``on_kill`` runs in a signal handler, possibly while the same thread waits for an answer: its
    call must not read the interrupted call's answer (nor leave its own for that call to read)."""
    import signal

    sock = tmp_path / "control.sock"
    plane = ControlPlane(task_uid=os.getuid())
    slow = plane.delegate
    monkeypatch.setattr(plane, "delegate", lambda ident, body: (time.sleep(0.6), slow(ident, body))[1])
    ready = threading.Event()
    threading.Thread(target=serve, args=(sock, plane), kwargs={"ready": ready.set}, daemon=True).start()
    assert ready.wait(10)
    client = ControlPlaneClient(str(sock), timeout=10)
    client.register(os.getpid(), {"dag_id": "d", "run_id": "r", "task_id": "tune", "try_number": 1})
    inner: list[dict] = []
    previous = signal.signal(signal.SIGALRM, lambda *_: inner.append(client.whoami()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        outer = client.call("/v1/tasks/delegate", {"seconds": 60})
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert inner == [{"dag_id": "d", "run_id": "r", "task_id": "tune", "try_number": 1, "map_index": -1}]
    assert set(outer) == {"delegation", "expires_in"}
    assert client.whoami()["task_id"] == "tune"  # and the thread's connection still answers in turn
    client.deregister(os.getpid())

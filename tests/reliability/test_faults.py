"""Faults in the middle of a governed run, on the real stack: the governance database goes away while a
task records lineage, and the scheduler and triggerer restart while a run waits for its approval.
After each: no credential alive, and nothing recorded that did not happen.

(A SIGKILLed tuning process, a failed tuning task and OpenBao hanging during revocation are in
tests/integration/test_lease_faults.py; a SIGKILLed task with its trainer in
tests/integration/test_tuning_on_stack.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support import StackView, wait_for_pid

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.demo import SETTLE_SECONDS
from airflow_finetune_gov.stack.manager import Stack
from airflow_finetune_gov.stack.provision import GOVERNANCE_DB

pytestmark = pytest.mark.stack
DAG_ID = "governed_finetune_faults"


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


@contextmanager
def governance_db_down(view: StackView) -> Iterator[None]:
    """No new connection to the governance database, and every open one cut: what a task sees when
    that database is down (Airflow's own metadata database stays up)."""
    with view.superuser() as conn:
        conn.execute(f"ALTER DATABASE {GOVERNANCE_DB} WITH ALLOW_CONNECTIONS false")
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (GOVERNANCE_DB,))
    try:
        yield
    finally:
        with view.superuser() as conn:
            conn.execute(f"ALTER DATABASE {GOVERNANCE_DB} WITH ALLOW_CONNECTIONS true")


def test_governance_db_down_fails_the_task_and_the_lease_is_revoked_anyway(view: StackView, tmp_path: Path) -> None:
    marker = tmp_path / "tune.pid"
    run_id = view.approved_run(DAG_ID, marker, "hold")
    wait_for_pid(marker)
    lease = view.training_lease(run_id)
    assert view.role_and_sessions(lease["db_role"])[0] == 1
    recorded = [(e.id, e.task_id, e.event_type) for e in view.events(run_id)]
    requester = view.client("requester")
    with governance_db_down(view):
        marker.with_suffix(".release").touch()  # the tuning job ends; its task must record that, and cannot
        assert requester.wait_run(DAG_ID, run_id, timeout=300) == "failed"
        tasks = requester.task_states(DAG_ID, run_id)
        assert tasks["tune"] == "failed" and tasks["revoke_lease"] == "failed", tasks
        # the tuned files reach the store only through the control plane, which first checks the run's approval
        # in lineage: it cannot read it, so nothing is stored, and tuning.completed is never written
        tune_log = view.task_log(DAG_ID, run_id, "tune")
        assert "could not read lineage events" in tune_log, tune_log[-2000:]
        # the teardown could not read or write lineage, and revoked the lease all the same (from XCom)
        teardown = view.task_log(DAG_ID, run_id, "revoke_lease")
        assert "the governance database is unavailable" in teardown
        assert f"{lease['lease_id']} (verified gone)" in teardown
        assert "lease.revoked -> lease.verified, NOT recorded" in teardown
        assert view.role_and_sessions(lease["db_role"]) == (0, 0)
        # the governance view says so, instead of a server error
        unavailable = view.client("auditor").session.get(f"{view.state['airflow']['url']}/fgov/api/runs", timeout=30)
        assert unavailable.status_code == 503 and "cannot be read now" in unavailable.text, unavailable.text
    # nothing was recorded while the database was down: the tuning's end did not happen as far as the
    # record goes, and the task that finished it failed instead of going on unrecorded
    assert [(e.id, e.task_id, e.event_type) for e in view.events(run_id)] == recorded
    # with the database back, the sweep finds the lease unsettled in lineage, already revoked, and records it
    ops = view.client("admin")  # the sweep's DAG is no team's: ops run it
    sweep = ops.trigger("fgov_lease_sweep", {})
    assert ops.wait_run("fgov_lease_sweep", sweep, timeout=300) == "success"
    settled = [(e.actor, e.event_type) for e in view.events(run_id)[len(recorded):]
               if e.payload_dict().get("lease_id") == lease["lease_id"]]
    assert settled == [("lease-sweep", "lease.revoked"), ("lease-sweep", "lease.verified")]
    assert fgov(["--state-dir", str(view.stack.dir), "audit", "verify"]) == 0


def test_a_pending_approval_survives_a_scheduler_and_triggerer_restart(view: StackView, tmp_path: Path) -> None:
    requester = view.client("requester")
    run_id = view.trigger(DAG_ID, mode="ok", marker=str(tmp_path / "tune.pid"))
    requester.wait_task_state(DAG_ID, run_id, "approval_gate", {"awaiting_input"}, timeout=120)
    for component in ("scheduler", "triggerer"):
        view.stack.restart(component, log=lambda *_: None)
    assert requester.task_states(DAG_ID, run_id)["approval_gate"] == "awaiting_input"
    assert training_lease_events(view, run_id) == []  # nothing leased while nobody has approved
    time.sleep(SETTLE_SECONDS)
    view.answer(DAG_ID, run_id, "approver1", "Approve", comment="after the restart")
    assert requester.wait_run(DAG_ID, run_id, timeout=300) == "success", requester.task_states(DAG_ID, run_id)
    kinds = [e.event_type for e in view.events(run_id)]
    assert kinds.count("approval.requested") == 1 and kinds.count("approval.granted") == 1, kinds
    granted = view.events(run_id, "approval.granted")[0].payload_dict()
    assert (granted["responder"], granted["comment"]) == ("approver1", "after the restart")
    lease = view.training_lease(run_id)
    steps = [(e.task_id, e.event_type) for e in view.events(run_id)]
    assert steps.index(("acquire_lease", "lease.issued")) > steps.index(("approval_gate", "approval.granted"))
    assert steps[-2:] == [("revoke_lease", "lease.revoked"), ("revoke_lease", "lease.verified")], steps
    assert view.role_and_sessions(lease["db_role"]) == (0, 0)


def training_lease_events(view: StackView, run_id: str) -> list[str]:
    return [e.event_type for e in view.events(run_id) if e.event_type.startswith("lease.")
            and e.task_id == "acquire_lease"]


def test_a_scheduler_restart_during_tuning_ends_with_the_lease_revoked(view: StackView, tmp_path: Path) -> None:
    marker = tmp_path / "tune.pid"
    run_id = view.approved_run(DAG_ID, marker, "hold")
    wait_for_pid(marker)
    lease = view.training_lease(run_id)
    view.stack.restart("scheduler", log=lambda *_: None)  # under the LocalExecutor, the task goes with it
    requester = view.client("requester")
    final = requester.wait_run(DAG_ID, run_id, timeout=600)
    tasks = requester.task_states(DAG_ID, run_id)
    assert final == "failed", (tasks, [(e.task_id, e.event_type) for e in view.events(run_id)],
                               view.task_log(DAG_ID, run_id, "tune")[-3000:])
    assert tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    events = view.events(run_id)
    steps = [(e.task_id, e.event_type) for e in events]
    assert ("tune", "tuning.completed") not in steps, steps  # the job was stopped, and is not recorded as done
    failed = next((e.payload_dict() for e in events if e.event_type == "tuning.failed"), None)
    assert failed is not None, (steps, view.task_log(DAG_ID, run_id, "tune")[-4000:])
    assert "cancelled" in failed["error"], failed
    # revoked by the killed task's on_kill, or else by the teardown: either way once, and proven
    settled = [e.event_type for e in events if e.event_type in ("lease.revoked", "lease.verified")
               and e.payload_dict()["lease_id"] == lease["lease_id"]]
    assert settled == ["lease.revoked", "lease.verified"], steps
    assert view.role_and_sessions(lease["db_role"]) == (0, 0)


def test_openbao_down_during_revocation_and_restarted_then_the_sweep_finishes(view: StackView,
                                                                              tmp_path: Path) -> None:
    marker = tmp_path / "tune.pid"
    run_id = view.approved_run(DAG_ID, marker, "hold")
    wait_for_pid(marker)
    lease = view.training_lease(run_id)
    requester = view.client("requester")
    view.stack.stop_component("openbao", log=lambda *_: None)
    try:
        marker.with_suffix(".release").touch()  # the job ends; the teardown finds OpenBao gone
        assert requester.wait_run(DAG_ID, run_id, timeout=300) == "failed"
        assert requester.task_states(DAG_ID, run_id)["revoke_lease"] == "failed"
        mine = [e for e in view.events(run_id) if e.payload_dict().get("lease_id") == lease["lease_id"]]
        assert [e.event_type for e in mine][-1] == "lease.revoke_failed", [e.event_type for e in mine]
        assert "lease.revoked" not in [e.event_type for e in mine]  # nothing reported revoked that is not
        assert view.role_and_sessions(lease["db_role"])[0] == 1
    finally:
        view.stack.restart("openbao", log=lambda *_: None)  # back on its storage, unsealed, leases and all
    ops = view.client("admin")  # the sweep's DAG is no team's: ops run it
    sweep = ops.trigger("fgov_lease_sweep", {})
    assert ops.wait_run("fgov_lease_sweep", sweep, timeout=300) == "success"
    ended = view.events(run_id, "lease.revoked") + view.events(run_id, "lease.verified")
    settled = [(e.actor, e.event_type) for e in ended if e.payload_dict()["lease_id"] == lease["lease_id"]]
    assert settled == [("lease-sweep", "lease.revoked"), ("lease-sweep", "lease.verified")]
    assert view.role_and_sessions(lease["db_role"]) == (0, 0)
    assert fgov(["--state-dir", str(view.stack.dir), "audit", "verify"]) == 0

"""The DAG author's attacks, performed from a task of a DAG the requester commits, on the real stack: the
task runs as the DAG user (not the scheduler's), holds no key, and reaches governance only through the
control plane, which knows which task is calling from the kernel.

- a forged approval: the task appends a grant in approver1's name and the reserved records that would make
  it count (the api-server's witness, a tier-auto decision, a run start), then the requester marks the gate
  success over REST: the reserved records are refused, the grant counts for nothing without a witnessed
  answer, neither the lease task nor the task's own login gets a credential;
- a requester disguised at parse time: DAG code rewrites the run's ``triggering_user_name`` in Airflow's
  metadata database (which the dag-processor holds by Airflow's design) so that an approver who triggered
  the run may approve it: the control plane takes the requester from the api-server's witness of the
  trigger, so its decision, and the request it renders, still leave them out of the approvers;
- a decoy request: the DAG opens a HITL request of its own ("the team lunch order") beside the gate and
  appends a grant in approver1's name; approver1 approves the decoy and the requester marks the gate
  success: the witness names the request answered, which is not one the control plane rendered for the
  decision, so no lease is issued;
- the model store: a task writes a model, an alias and a stored version's file directly (the store is the
  control plane's: refused by the kernel), and hands the control plane a "tuned file" that is a symlink to,
  then a hard link of, a file only root may read: nothing is stored; the run's own tuned files are copied in
  by the control plane, which records ``model.stored``;
- a promotion after a failed evaluation: the requester marks the failed evaluation success and clears the
  promotion; the promotion runs in the control plane, reads the verdict the control plane recorded, and
  moves nothing;
- a task pretending to be another: the control plane names the caller from its process, whatever it asks.
"""

from __future__ import annotations

import json
import pwd
import time
from pathlib import Path
from typing import Any

import pytest
from support import StackView

from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DAG_ID = "forged_approval"


def requested_run(view: StackView, dag_id: str) -> tuple[Any, str, Path]:
    """The requester's run of attack DAG ``dag_id``, its gate waiting for an answer, and the (cleared) report
    file its attacking task writes beside it."""
    client = view.client("requester")
    client.wait_for_dag(dag_id)
    report_file = view.stack.dir / "dags" / f"{dag_id}.report.json"
    report_file.unlink(missing_ok=True)
    run_id = view.trigger(dag_id)
    client.wait_task_state(dag_id, run_id, "approval_gate", {"awaiting_input"}, timeout=180)
    return client, run_id, report_file


def test_a_task_cannot_approve_its_own_run(stack: Stack) -> None:
    view = StackView(stack)
    client, run_id, report_file = requested_run(view, DAG_ID)
    deadline = time.monotonic() + 180
    while not report_file.exists():
        assert time.monotonic() < deadline, client.task_states(DAG_ID, run_id)
        time.sleep(1)
    resp = client.request("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approval_gate",
                          json={"new_state": "success"})
    assert resp.status_code == 200, resp.text  # the requester may mark their own DAG's task
    assert client.wait_run(DAG_ID, run_id, timeout=300) == "failed"
    tasks = client.task_states(DAG_ID, run_id)
    assert tasks["forge"] == "success" and tasks["acquire_lease"] == "failed" and tasks["tune"] != "success", tasks

    report = json.loads(report_file.read_text())
    for reserved in ("approval.witnessed", "policy.decided", "run.started"):
        assert report[reserved].startswith("refused:") and "never by a task" in report[reserved], report
    assert report["approval.granted"] == "appended", report  # a task's own key: accepted, and worthless
    assert report["lease login"].startswith("refused:") and "not witnessed" in report["lease login"], report

    events = view.events(run_id)
    kinds = [e.event_type for e in events]
    assert "approval.witnessed" not in kinds and kinds.count("policy.decided") == 1
    assert kinds.count("run.started") == 1
    forged = [e for e in events if e.event_type == "approval.granted"]
    assert [(e.task_id, e.payload_dict()["responder"]) for e in forged] == [("forge", "approver1")]
    refused = [e.payload_dict()["reason"] for e in events if e.event_type == "lease.refused"]
    assert refused and "not witnessed by the api-server" in refused[-1] and "approver1" in refused[-1], refused
    issued = [e.payload_dict()["purpose"] for e in events if e.event_type == "lease.issued"]
    # the policy check's digest and screening leases only: no training credential
    assert "catalog" in issued and set(issued) <= {"catalog", "screen"}, issued


def test_a_requester_rewritten_at_parse_time_is_still_the_requester(stack: Stack) -> None:
    view = StackView(stack)
    dag_id, dags = "spoofed_requester", stack.dir / "dags"
    approver1 = view.client("approver1")
    approver1.wait_for_dag(dag_id)
    report = dags / "spoofed_requester.report.json"
    report.unlink(missing_ok=True)
    assert approver1.request("PATCH", f"/dags/{dag_id}", json={"is_paused": True}).status_code == 200
    try:
        run_id = approver1.trigger(dag_id, {})  # approver1 asks for the change: they may not approve it
        (dags / "spoofed_requester.spoof").write_text(json.dumps({"run_id": run_id, "user": "approver2"}))
        deadline = time.monotonic() + 180
        while not report.exists():
            assert time.monotonic() < deadline, "the parse-time code did not run"
            time.sleep(1)
        assert json.loads(report.read_text()) == {"updated": 1, "user": "approver2"}
    finally:
        assert approver1.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False}).status_code == 200
    approver1.wait_task_state(dag_id, run_id, "approval_gate", {"awaiting_input"}, timeout=180)
    time.sleep(8)  # see SETTLE_SECONDS in test_approval_binding
    # The decision, made in the control plane, names approver1 the requester; the request the control plane
    # renders for it goes to approver2 only, and Airflow refuses approver1's own answer
    view.answer(dag_id, run_id, "approver1", "Approve", status=403)
    view.answer(dag_id, run_id, "approver2", "Reject", comment="not mine to approve blind")
    assert approver1.wait_run(dag_id, run_id, timeout=300) == "failed"
    tasks = approver1.task_states(dag_id, run_id)
    assert tasks["approval_gate"] == "failed" and tasks["acquire_lease"] == "upstream_failed", tasks

    events = view.events(run_id)
    started = next(e.payload_dict() for e in events if e.event_type == "run.started")
    requested = next(e.payload_dict() for e in events if e.event_type == "run.requested")
    decided = next(e.payload_dict() for e in events if e.event_type == "policy.decided")
    asked = next(e.payload_dict() for e in events if e.event_type == "approval.requested")
    assert started["triggering_user_name"] == "approver2"  # the metadata database was rewritten ...
    assert requested["triggering_user_name"] == "approver1"  # ... the api-server saw who asked
    assert decided["request"]["requester"] == "approver1" and "approver1" not in decided["approvers"], decided
    assert asked["approvers"] == ["approver2"] and "approver1" in asked["excluded"], asked
    witnessed = [e.payload_dict()["responder"] for e in events if e.event_type == "approval.witnessed"]
    assert witnessed == ["approver2"], witnessed  # approver1's answer was refused by Airflow: no witness
    rejected = next(e.payload_dict() for e in events if e.event_type == "approval.rejected")
    assert rejected["responder"] == "approver2", rejected
    assert not [e for e in events if e.event_type == "approval.granted"]
    assert not [e for e in events if e.event_type == "lease.issued" and e.payload_dict()["purpose"] == "training"]


def test_an_approve_given_to_a_decoy_request_approves_nothing(stack: Stack) -> None:
    view, dag_id = StackView(stack), "decoy_request"
    requester = view.client("requester")
    requester.wait_for_dag(dag_id)
    run_id = view.trigger(dag_id)
    requester.wait_task_state(dag_id, run_id, "lunch_order", {"awaiting_input"}, timeout=180)
    requester.wait_task_state(dag_id, run_id, "approval_gate", {"awaiting_input"}, timeout=180)
    requester.wait_task_state(dag_id, run_id, "forge_grant", {"success"}, timeout=180)
    time.sleep(8)  # see SETTLE_SECONDS in test_approval_binding
    view.answer(dag_id, run_id, "approver1", "Approve", task_id="lunch_order")
    resp = requester.request("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/approval_gate",
                             json={"new_state": "success"})
    assert resp.status_code == 200, resp.text
    assert requester.wait_run(dag_id, run_id, timeout=300) == "failed"
    tasks = requester.task_states(dag_id, run_id)
    assert tasks["lunch_order"] == "success" and tasks["acquire_lease"] == "failed", tasks

    events = view.events(run_id)
    gate = [e.payload_dict() for e in events if e.event_type == "approval.requested"]
    (answered,) = [e for e in events if e.event_type == "approval.witnessed"]
    witnessed = answered.payload_dict()
    assert answered.task_id == "lunch_order" and witnessed["responder"] == "approver1"
    assert witnessed["subject"] == "Approve the team lunch order for Friday"
    assert gate and witnessed["request_sha256"] not in {g["request_sha256"] for g in gate}
    refused = [e.payload_dict()["reason"] for e in events if e.event_type == "lease.refused"]
    assert refused and "Approve given to another request" in refused[-1] and "approver1" in refused[-1], refused
    assert not [e for e in events if e.event_type == "lease.issued" and e.payload_dict()["purpose"] == "training"]


def test_the_model_store_is_written_by_the_control_plane_only(stack: Stack) -> None:
    view, dag_id = StackView(stack), "store_tamper"
    requester, run_id, report_file = requested_run(view, dag_id)
    time.sleep(8)  # see SETTLE_SECONDS in test_approval_binding
    view.answer(dag_id, run_id, "approver1", "Approve")
    assert requester.wait_run(dag_id, run_id, timeout=400) == "success", requester.task_states(dag_id, run_id)
    report = json.loads(report_file.read_text())
    for label in ("new model", "alias file", "version file"):
        assert report[label] == "refused: Permission denied", report
    assert report["symlink"].startswith("refused:") and "symlink is never followed" in report["symlink"], report
    hard = report["hard link"]
    assert hard.startswith("link refused by the kernel") or "not by the task that stages it" in hard, report

    events = view.events(run_id)
    (stored,) = [e for e in events if e.event_type == "model.stored"]
    assert stored.task_id == "tune" and stored.actor == "control-plane"
    s = stored.payload_dict()
    tuned = next(e.payload_dict() for e in events if e.event_type == "tuning.completed")
    assert (s["model"], s["version"]) == (tuned["model"], tuned["version"])
    version_dir = stack.dir / "models" / s["model"] / s["version"]
    plane_uid = pwd.getpwnam(stack.load()["control_plane"]["user"]).pw_uid  # the control plane's own user
    assert {p.stat().st_uid for p in [version_dir, *version_dir.iterdir()]} == {plane_uid} != {0}
    assert not (stack.dir / "models" / "evil").exists()
    staged = [p for p in (stack.dir / "models" / ".staging").rglob("*") if not p.is_dir() or p.is_symlink()]
    assert staged == []  # each hand-over's staging directory is gone with its files


def test_a_failed_evaluation_marked_success_promotes_nothing(stack: Stack) -> None:
    view, demo = StackView(stack), "governed_finetune_demo"
    requester = view.client("requester")
    run_id = view.trigger(demo, dataset="poisoned")
    requester.wait_task_state(demo, run_id, "approval_gate", {"awaiting_input"}, timeout=180)
    time.sleep(8)  # see SETTLE_SECONDS in test_approval_binding
    view.answer(demo, run_id, "approver1", "Approve")
    view.wait_round(demo, run_id, 2)  # screening flagged the poisoned rows: a quorum
    view.answer(demo, run_id, "approver2", "Approve")
    assert requester.wait_run(demo, run_id, timeout=400) == "failed"
    assert requester.task_states(demo, run_id)["evaluate"] == "failed"
    for method, path, body in (
            ("PATCH", f"/dags/{demo}/dagRuns/{run_id}/taskInstances/evaluate", {"new_state": "success"}),
            ("POST", f"/dags/{demo}/clearTaskInstances", {"dry_run": False, "dag_run_id": run_id,
                                                          "task_ids": ["promote"], "include_downstream": True,
                                                          "only_failed": False, "reset_dag_runs": True})):
        resp = requester.request(method, path, json=body)
        assert resp.status_code == 200, resp.text  # Airflow lets the requester do both
    assert requester.wait_run(demo, run_id, timeout=300) == "failed"
    tasks = requester.task_states(demo, run_id)
    assert tasks["evaluate"] == "success" and tasks["promote"] == "failed", tasks
    events = view.events(run_id)
    blocked = [e.payload_dict()["reason"] for e in events if e.event_type == "promotion.blocked"]
    assert blocked and "evaluation verdict fail" in blocked[-1], blocked
    assert not [e for e in events if e.event_type in ("promotion.completed", "provenance.signed")]


def test_the_control_plane_names_the_caller_from_its_process(stack: Stack) -> None:
    """This test process (root, not a task the executor started) asks as if it were a task: refused; and an
    executor registration from the DAG user is refused too."""
    from airflow_finetune_gov.control.client import ControlPlaneClient, ControlPlaneError

    plane = ControlPlaneClient((stack.load() or {})["control_plane"]["socket"], timeout=30)
    with pytest.raises(ControlPlaneError, match="is no task the executor started"):
        plane.call("/v1/lineage/events", {"dag_id": DAG_ID, "run_id": "x"})
    with pytest.raises(ControlPlaneError, match="is no task the executor started"):
        plane.login("lease-benign", "lease", {"dataset": "benign", "approval_id": "x"})
    import subprocess
    import sys

    code = ("from airflow_finetune_gov.control.client import ControlPlaneClient as C\n"
            f"C({plane.socket_path!r}).register(1, {{'dag_id': 'd', 'run_id': 'r', 'task_id': 't', 'try_number': 1}})")
    result = subprocess.run([sys.executable, "-c", code], user="fgov-dag", group="fgov-dag", extra_groups=[],
                            capture_output=True, text=True, cwd="/", env={"PATH": "/usr/bin:/bin"}, check=False)
    assert result.returncode != 0 and "may not register task processes" in result.stderr, result.stderr[-500:]

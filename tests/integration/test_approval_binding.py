"""An approval answers one decision of one run, and issues a bounded number of leases: the requester's
attacks over the REST API alone, performed on the real api-server and scheduler.

- run-id replay: an approved run is deleted and triggered again with the same run id (for other data,
  or with its policy check and gate marked success before it starts): the new run inherits nothing;
- re-decided run: the DAG author changes the dataset and clears the policy check of an approved run,
  then marks the gate success: the new decision has no approval;
- clearing the lease task again and again: one approval issues ``max_leases_per_approval`` leases.
"""

from __future__ import annotations

import time

import pytest
from support import StackView

from airflow_finetune_gov.lineage.runs import RUN_STARTED
from airflow_finetune_gov.policy.engine import DEFAULT_MAX_LEASES_PER_APPROVAL
from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DAG_ID = "governed_finetune_redecide"


class Requester(StackView):
    """What a ``user`` may do over REST to their own DAG's runs."""

    def rest(self, method: str, path: str, status: int = 200, user: str = "requester", **kwargs: object) -> dict:
        resp = self.client(user).request(method, path, **kwargs)
        assert resp.status_code == status, f"{method} {path}: {resp.status_code} {resp.text[:300]}"
        return resp.json() if resp.content else {}

    def trigger_as(self, run_id: str) -> None:
        self.rest("POST", f"/dags/{DAG_ID}/dagRuns", json={"dag_run_id": run_id, "logical_date": None, "conf": {}})

    def mark(self, run_id: str, task_id: str, state: str = "success") -> None:
        self.rest("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}", json={"new_state": state})

    def clear(self, run_id: str, task_id: str, downstream: bool = True) -> None:
        self.rest("POST", f"/dags/{DAG_ID}/clearTaskInstances", json={
            "dry_run": False, "dag_run_id": run_id, "task_ids": [task_id], "include_downstream": downstream,
            "only_failed": False, "reset_dag_runs": True})

    def set_dataset(self, dataset: str) -> None:
        """The DAG author edits the DAG: the next task started parses the file again."""
        (self.stack.dir / "dags" / f"{DAG_ID}.dataset").write_text(dataset)

    def approved_and_finished(self, run_id: str) -> None:
        self.trigger_as(run_id)
        self.client("requester").wait_task_state(DAG_ID, run_id, "approval_gate", {"awaiting_input"}, timeout=120)
        time.sleep(8)  # see SETTLE_SECONDS: the process that paused the gate must have exited
        self.answer(DAG_ID, run_id, "approver1", "Approve")
        assert self.client("requester").wait_run(DAG_ID, run_id, timeout=300) == "success", self.tasks(run_id)

    def tasks(self, run_id: str) -> dict[str, str | None]:
        return self.client("requester").task_states(DAG_ID, run_id)

    def ended(self, run_id: str) -> dict[str, str | None]:
        self.client("requester").wait_run(DAG_ID, run_id, timeout=300)
        return self.tasks(run_id)

    def training_leases(self, run_id: str) -> list[dict]:
        return [e.payload_dict() for e in self.events(run_id, "lease.issued") if e.task_id == "acquire_lease"]

    def refusals(self, run_id: str) -> list[str]:
        return [e.payload_dict()["reason"] for e in self.events(run_id, "lease.refused")]


@pytest.fixture(scope="module")
def requester(stack: Stack) -> Requester:
    view = Requester(stack)
    view.client("requester").wait_for_dag(DAG_ID)
    view.set_dataset("benign")
    return view


def test_a_deleted_run_triggered_again_under_its_run_id_inherits_no_approval(requester: Requester) -> None:
    run_id = f"replay-{time.time_ns()}"
    requester.approved_and_finished(run_id)
    assert len(requester.training_leases(run_id)) == 1

    # 1. Same run id, other data: the new run's policy check makes a new decision, which nobody answered.
    requester.rest("DELETE", f"/dags/{DAG_ID}/dagRuns/{run_id}", status=204)
    requester.set_dataset("public_faq")
    try:
        requester.trigger_as(run_id)
        requester.client("requester").wait_task_state(DAG_ID, run_id, "approval_gate", {"awaiting_input"})
        requester.mark(run_id, "approval_gate")
        tasks = requester.ended(run_id)
    finally:
        requester.set_dataset("benign")
    assert tasks["acquire_lease"] == "failed" and tasks["tune"] == "upstream_failed", tasks
    assert "recorded for decision" in requester.refusals(run_id)[-1]

    # 2. Same run id, same data, and the policy check and gate marked success before the run starts (the
    # DAG paused): no decision is made in the new run, and the old run's decision and approval are not its own.
    requester.rest("DELETE", f"/dags/{DAG_ID}/dagRuns/{run_id}", status=204)
    requester.rest("PATCH", f"/dags/{DAG_ID}", json={"is_paused": True})
    try:
        requester.trigger_as(run_id)
        for task_id in ("policy_check", "approval_gate"):
            requester.mark(run_id, task_id)
    finally:
        requester.rest("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
    tasks = requester.ended(run_id)
    assert tasks["policy_check"] == "success" and tasks["acquire_lease"] == "failed", tasks
    assert "has no recorded policy decision" in requester.refusals(run_id)[-1]

    # Three runs under one run id, three scheduler records with three keys; one lease in all.
    keys = [e.payload_dict()["dag_run_id"] for e in requester.events(run_id, RUN_STARTED)]
    assert len(keys) == 3 and len(set(keys)) == 3, keys
    assert len(requester.training_leases(run_id)) == 1


def test_a_run_decided_again_after_its_approval_needs_a_new_approval(requester: Requester) -> None:
    run_id = f"redecide-{time.time_ns()}"
    requester.approved_and_finished(run_id)
    requester.set_dataset("poisoned")
    try:
        requester.clear(run_id, "policy_check")
        requester.client("requester").wait_task_state(DAG_ID, run_id, "approval_gate", {"awaiting_input"})
        requester.mark(run_id, "approval_gate")
        tasks = requester.ended(run_id)
    finally:
        requester.set_dataset("benign")
    assert tasks["acquire_lease"] == "failed", tasks
    decisions = [e.payload_dict() for e in requester.events(run_id, "policy.decided")]
    assert [d["request"]["dataset"] for d in decisions] == ["benign", "poisoned"]
    reason = requester.refusals(run_id)[-1]
    assert decisions[1]["decision_id"] in reason and "answered an earlier decision" in reason, reason
    leases = requester.training_leases(run_id)
    assert [lease["dataset"] for lease in leases] == ["benign"], leases  # poisoned was never leased


def test_an_answer_given_to_a_decision_that_changed_meanwhile_approves_nothing(requester: Requester) -> None:
    run_id = f"superseded-{time.time_ns()}"
    requester.trigger_as(run_id)
    requester.client("requester").wait_task_state(DAG_ID, run_id, "approval_gate", {"awaiting_input"}, timeout=120)
    requester.set_dataset("poisoned")
    try:  # the policy check alone runs again while the request (for benign) is open
        requester.clear(run_id, "policy_check", downstream=False)
        deadline = time.monotonic() + 120
        while len(requester.events(run_id, "policy.decided")) < 2:
            assert time.monotonic() < deadline, "the policy check did not run again"
            time.sleep(0.5)
    finally:
        requester.set_dataset("benign")
    time.sleep(8)
    requester.answer(DAG_ID, run_id, "approver1", "Approve")  # approver1 read the summary of benign
    tasks = requester.ended(run_id)
    assert tasks["approval_gate"] == "failed" and tasks["acquire_lease"] == "upstream_failed", tasks
    superseded = requester.events(run_id, "approval.superseded")[0].payload_dict()
    decisions = [e.payload_dict() for e in requester.events(run_id, "policy.decided")]
    assert superseded["asked_decision_sha256"] == decisions[0]["decision_sha256"]
    assert superseded["decision_sha256"] == decisions[1]["decision_sha256"] and superseded["responder"] == "approver1"
    assert requester.events(run_id, "approval.granted") == [] and requester.training_leases(run_id) == []


def test_clearing_the_lease_task_issues_no_more_leases_than_the_policy_allows(requester: Requester) -> None:
    run_id = f"leases-{time.time_ns()}"
    requester.approved_and_finished(run_id)
    for _ in range(DEFAULT_MAX_LEASES_PER_APPROVAL - 1):
        requester.clear(run_id, "acquire_lease")
        assert requester.client("requester").wait_run(DAG_ID, run_id, timeout=300) == "success"
    leases = requester.training_leases(run_id)
    assert [lease["lease_number"] for lease in leases] == list(range(1, DEFAULT_MAX_LEASES_PER_APPROVAL + 1))
    assert len({lease["lease_id"] for lease in leases}) == DEFAULT_MAX_LEASES_PER_APPROVAL
    requester.clear(run_id, "acquire_lease")
    tasks = requester.ended(run_id)
    assert tasks["acquire_lease"] == "failed" and tasks["tune"] == "upstream_failed", tasks
    refused = requester.events(run_id, "lease.refused")[-1].payload_dict()
    assert refused["leases_issued"] == DEFAULT_MAX_LEASES_PER_APPROVAL == refused["limit"]
    assert refused["earlier_leases"] == [lease["lease_id"] for lease in leases]
    assert len(requester.training_leases(run_id)) == DEFAULT_MAX_LEASES_PER_APPROVAL
    for lease in leases:  # every lease the approval issued is revoked and proven gone
        assert requester.role_and_sessions(lease["db_role"]) == (0, 0)

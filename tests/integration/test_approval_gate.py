"""The approval gate on the real Airflow api-server + scheduler: policy tiers, quorum of distinct
approvers answering over REST, fail-closed expiry, and promotion bound to the approved environment."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
from receivers import Mailbox, WebhookReceiver
from support import StackView

from airflow_finetune_gov.datasets.demo import BENIGN_SET
from airflow_finetune_gov.registry.store import ModelStore
from airflow_finetune_gov.stack import people
from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack
APPROVALS_DAG = "governed_finetune_approvals"


class Gate(StackView):
    def final(self, dag_id: str, run_id: str) -> tuple[str, dict[str, str | None]]:
        requester = self.client("requester")
        return requester.wait_run(dag_id, run_id, timeout=300), requester.task_states(dag_id, run_id)

    def training_lease_events(self, run_id: str) -> list[str]:
        return [e.event_type for e in self.events(run_id) if e.event_type.startswith("lease.")
                and e.task_id in ("acquire_lease", "tune", "revoke_lease")]

    def leased_roles(self) -> int:
        with self.superuser() as conn:
            row = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-%'").fetchone()
        assert row is not None
        return int(row[0])


@pytest.fixture(scope="module")
def gate(stack: Stack) -> Gate:
    return Gate(stack)


def mails(mailbox: Mailbox, run_id: str, kind: str, count: int = 1) -> list[tuple[list[str], str, str]]:
    """The notifications of ``kind`` about ``run_id`` the stack's control plane mailed: (to, subject, text)."""
    quoted = quote(run_id, safe="")  # the governance view's link quotes it whole; Airflow's keeps ':' and '+'

    def about(_to: list[str], m: Any) -> bool:
        return m["X-Fgov-Kind"] == kind and (run_id in m.get_content() or quoted in m.get_content())

    return [(sorted(to), str(m["Subject"]), m.get_content()) for to, m in mailbox.wait_for(about, count)]


def test_public_data_into_test_is_approved_by_policy_without_a_human(gate: Gate) -> None:
    run_id = gate.trigger(DEMO_DAG_ID, dataset="public_faq", target_environment="test")
    state, tasks = gate.final(DEMO_DAG_ID, run_id)
    assert state == "success", tasks
    decided = gate.events(run_id, "policy.decided")[0].payload_dict()
    assert decided["tier"] == "auto" and "public data into a test model" in decided["reasons"][0]
    granted = gate.events(run_id, "approval.granted")
    assert [g.payload_dict()["responder"] for g in granted] == ["policy"]
    assert gate.events(run_id, "approval.requested") == []  # nobody was asked
    detail = gate.client("auditor").request(
        "GET", f"/dags/{DEMO_DAG_ID}/dagRuns/{run_id}/taskInstances/approval_gate/-1/hitlDetails")
    assert detail.status_code == 404  # no HITL request was ever created
    assert gate.events(run_id, "promotion.completed")[0].payload_dict()["alias"] == "test"


def test_production_needs_two_distinct_approvers_each_saying_why_and_shows_the_progress(
        gate: Gate, mailbox: Mailbox, webhook: WebhookReceiver) -> None:
    run_id = gate.trigger(DEMO_DAG_ID, dataset="benign", target_environment="production",
                          justification="support answers for the 2.0 launch")
    gate.wait_round(DEMO_DAG_ID, run_id, 1)
    detail = gate.client("approver1").hitl_detail(DEMO_DAG_ID, run_id, "approval_gate")
    assert detail["subject"] == "[production · 0 of 2 approved] benign → fgov-demo-tiny"
    for text in ("0 of 2 approved - waiting for 2 approver(s) (approver1, approver2)", "Answer by",
                 "required for Approve and Reject", "support answers for the 2.0 launch", "support-content team",
                 "Sample row", "Now in production", "a regression blocks promotion", "2 distinct approver(s)"):
        assert text in detail["body"], f"{text!r} not in the request"
    # the approvers are told, with a link to the request in Airflow
    link = f"{gate.state['airflow']['url']}/dags/{DEMO_DAG_ID}/runs/{run_id}/tasks/approval_gate/required_actions"
    ((to, subject, text),) = mails(mailbox, run_id, "requested")
    assert to == ["approver1@localhost", "approver2@localhost"], to
    assert subject == "Approval requested: [production · 0 of 2 approved] benign → fgov-demo-tiny"
    assert f"{link}?map_index=-1" in text and "requester asks you to approve benign → " in text
    (post,) = webhook.wait_for(lambda p: p["fgov"]["link"] == f"{link}?map_index=-1")
    assert post["fgov"]["to"] == ["approver1", "approver2"] and post["text"].startswith("*Approval requested")
    gate.answer(DEMO_DAG_ID, run_id, "approver1", "Approve")  # no comment: production answers say why
    gate.wait_round(DEMO_DAG_ID, run_id, 2)
    (incomplete,) = [e.payload_dict() for e in gate.events(run_id, "approval.incomplete")]
    assert incomplete["responder"] == "approver1" and "every answer about production says why" in incomplete["reason"]
    assert gate.events(run_id, "approval.granted") == []
    gate.answer(DEMO_DAG_ID, run_id, "approver1", "Approve", comment="data reviewed, LGTM")
    gate.wait_round(DEMO_DAG_ID, run_id, 3)
    detail = gate.client("approver2").hitl_detail(DEMO_DAG_ID, run_id, "approval_gate")
    assert detail["subject"] == "[production · 1 of 2 approved] benign → fgov-demo-tiny"
    assert "1 of 2 approved: approver1 ✓ (\u201cdata reviewed, LGTM\u201d) - waiting for another approver " \
           "(approver2)" in detail["body"]
    assert [u["name"] for u in detail["assigned_users"]] == ["approver2"], detail["assigned_users"]  # not asked again
    gate.answer(DEMO_DAG_ID, run_id, "approver1", "Approve", comment="approving again", status=403)
    progress = mails(mailbox, run_id, "requested", 3)[-1]  # round 2 (approver1's answer not counted), round 3
    assert progress[:2] == (["approver2@localhost"],
                            "Approval still needed: [production · 1 of 2 approved] benign → fgov-demo-tiny")
    assert "approved so far: approver1" in progress[2]
    assert gate.training_lease_events(run_id) == []  # one approval is not a quorum
    gate.answer(DEMO_DAG_ID, run_id, "approver2", "Approve", comment="second pair of eyes")
    state, tasks = gate.final(DEMO_DAG_ID, run_id)
    assert state == "success", tasks
    granted = [g.payload_dict() for g in gate.events(run_id, "approval.granted")]
    assert [(g["responder"], g["comment"]) for g in granted] == [("approver1", "data reviewed, LGTM"),
                                                                ("approver2", "second pair of eyes")]
    assert all(g["responded_at"] for g in granted)
    decided = gate.events(run_id, "approval.decided")[0].payload_dict()
    assert decided == {"outcome": "approved", "approvers": ["approver1", "approver2"], "tier": "quorum"}
    promoted = gate.events(run_id, "promotion.completed")[0].payload_dict()
    assert promoted["alias"] == "production" and promoted["approvers"] == ["approver1", "approver2"]
    requested = [e.payload_dict() for e in gate.events(run_id, "approval.requested")]
    assert [(r["approved_by"], r["assigned"]) for r in requested] == [
        ([], ["approver1", "approver2"]), ([], ["approver1", "approver2"]), (["approver1"], ["approver2"])]
    # the requester is told the outcome, with who approved and why, and a link to the run's governance page
    ((to, subject, text),) = mails(mailbox, run_id, "decided")
    assert (to, subject) == (["requester@localhost"], "Approved: benign → fgov-demo-tiny (production)")
    assert "- approver2: “second pair of eyes”" in text and "/fgov/ui/runs/" in text
    sent = [e.payload_dict() for e in gate.events(run_id, "notification.sent")]
    assert {(s["kind"], s["channel"]) for s in sent} >= {("requested", "email"), ("requested", "webhook"),
                                                         ("decided", "email"), ("decided", "webhook")}


def test_one_reject_rejects_a_quorum_request(gate: Gate) -> None:
    before = gate.leased_roles()
    run_id = gate.trigger(DEMO_DAG_ID, dataset="benign", target_environment="production")
    gate.wait_round(DEMO_DAG_ID, run_id, 1)
    gate.answer(DEMO_DAG_ID, run_id, "approver1", "Approve", comment="fine by me")
    gate.wait_round(DEMO_DAG_ID, run_id, 2)
    gate.answer(DEMO_DAG_ID, run_id, "approver2", "Reject", comment="not for production yet")
    state, tasks = gate.final(DEMO_DAG_ID, run_id)
    assert state == "failed" and tasks["approval_gate"] == "failed", tasks
    assert tasks["acquire_lease"] == "upstream_failed" and tasks["tune"] == "upstream_failed", tasks
    rejected = gate.events(run_id, "approval.rejected")[0].payload_dict()
    assert rejected["responder"] == "approver2" and rejected["comment"] == "not for production yet"
    decided = gate.events(run_id, "approval.decided")[0].payload_dict()
    assert decided["outcome"] == "rejected" and "approver2" in decided["reason"]
    assert gate.training_lease_events(run_id) == []
    assert gate.leased_roles() == before


def test_no_answer_before_the_deadline_rejects_as_expired(gate: Gate, mailbox: Mailbox) -> None:
    before = gate.leased_roles()
    run_id = gate.trigger(APPROVALS_DAG, dataset="benign", target_environment="staging")
    state, tasks = gate.final(APPROVALS_DAG, run_id)  # nobody answers; response_timeout is 20 s
    assert state == "failed" and tasks["approval_gate"] == "failed", tasks
    assert tasks["acquire_lease"] == "upstream_failed", tasks
    kinds = [e.event_type for e in gate.events(run_id)]
    assert "approval.expired" in kinds and "approval.granted" not in kinds
    assert gate.events(run_id, "approval.decided")[0].payload_dict() == {"outcome": "rejected", "reason": "expired"}
    assert gate.training_lease_events(run_id) == []
    # the approvers were reminded half-way through the 20 s, and the requester told it expired
    ((to, subject, _text),) = mails(mailbox, run_id, "reminder")
    assert to == ["approver1@localhost", "approver2@localhost"] and subject.startswith("Reminder: [staging"), subject
    ((to, subject, text),) = mails(mailbox, run_id, "decided")
    assert to == ["requester@localhost"] and subject == "Rejected: benign → fgov-demo-tiny (staging)"
    assert "was rejected: expired" in text
    assert gate.leased_roles() == before


def test_approvers_are_whoever_holds_the_teams_approver_role_when_asked_and_when_counted(gate: Gate) -> None:
    """The policy names role:support-approvers. Ops make approver3 an approver (after the DAG was written): the
    next request assigns them, and their Approve counts. Ops take approver1 out of the role while the request is
    open: approver1's Approve, which Airflow still accepts (the request assigned them), is a violation and counts
    for nothing, and the request is asked again of the others."""
    assert "role:support-approvers" in (gate.stack.dir / "policy.yaml").read_text()
    had3 = gate.set_roles("approver3", [*people.USERS["approver3"], "support-approvers"])
    try:
        run_id = gate.trigger(DEMO_DAG_ID, dataset="benign", target_environment="staging")
        gate.wait_round(DEMO_DAG_ID, run_id, 1)
        first = gate.events(run_id, "approval.requested")[0].payload_dict()
        assert first["assigned"] == ["approver1", "approver2", "approver3"], first
        had1 = gate.set_roles("approver1", [r for r in people.USERS["approver1"] if r != "support-approvers"])
        try:
            gate.answer(DEMO_DAG_ID, run_id, "approver1", "Approve", comment="still thinks they may")
            gate.wait_round(DEMO_DAG_ID, run_id, 2)
            (violation,) = [e.payload_dict() for e in gate.events(run_id, "approval.violation")]
            assert violation["responder"] == "approver1" and "no longer an approver" in violation["reason"], violation
            second = gate.events(run_id, "approval.requested")[1].payload_dict()
            assert (second["assigned"], second["withdrawn"]) == (["approver2", "approver3"], ["approver1"])
            assert gate.events(run_id, "approval.granted") == [] and gate.training_lease_events(run_id) == []
            gate.answer(DEMO_DAG_ID, run_id, "approver1", "Approve", comment="again", status=403)  # not assigned now
        finally:
            gate.set_roles("approver1", had1)
        gate.answer(DEMO_DAG_ID, run_id, "approver3", "Approve", comment="approver3, approver since this morning")
        state, tasks = gate.final(DEMO_DAG_ID, run_id)
        assert state == "success", tasks
        assert [g.payload_dict()["responder"] for g in gate.events(run_id, "approval.granted")] == ["approver3"]
    finally:
        gate.set_roles("approver3", had3)


def test_a_run_approved_for_test_cannot_promote_to_production(gate: Gate) -> None:
    store = ModelStore(gate.state["model_store"])
    production_before = store.aliases("fgov-demo-tiny").get("production")
    run_id = gate.trigger(APPROVALS_DAG, dataset="public_faq", target_environment="test",
                          promote_alias="production")
    state, tasks = gate.final(APPROVALS_DAG, run_id)
    assert state == "failed" and tasks["promote"] == "failed" and tasks["tune"] == "success", tasks
    blocked = gate.events(run_id, "promotion.blocked")[0].payload_dict()
    assert "'production' is not the approved target environment 'test'" in blocked["reason"]
    assert gate.events(run_id, "promotion.completed") == []
    assert store.aliases("fgov-demo-tiny").get("production") == production_before


def test_data_changed_after_approval_is_refused_by_the_tuning_step(gate: Gate) -> None:
    run_id = gate.trigger(DEMO_DAG_ID, dataset="benign", target_environment="staging")
    gate.wait_round(DEMO_DAG_ID, run_id, 1)
    approved = gate.events(run_id, "policy.decided")[0].payload_dict()["dataset"]
    assert approved["rows"] == len(BENIGN_SET) and len(approved["sha256"]) == 64
    detail = gate.client("approver1").hitl_detail(DEMO_DAG_ID, run_id, "approval_gate")
    for text in (approved["uri"], approved["sha256"], "epochs=10", "learning_rate=0.01"):
        assert text in detail["body"], f"{text!r} missing from the change summary"
    with gate.superuser("fgov_datasets") as conn:
        (row_id,) = conn.execute("INSERT INTO datasets.benign (prompt, response) VALUES "
                                 "('slipped in', 'after the approval') RETURNING id").fetchone()
        try:
            gate.answer(DEMO_DAG_ID, run_id, "approver1", "Approve")
            state, tasks = gate.final(DEMO_DAG_ID, run_id)
        finally:
            conn.execute("DELETE FROM datasets.benign WHERE id = %s", (row_id,))
    assert state == "failed" and tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    refused = gate.events(run_id, "tuning.refused")[0].payload_dict()
    assert refused["approved_sha256"] == approved["sha256"] and refused["rows"] == len(BENIGN_SET) + 1
    assert gate.events(run_id, "tuning.completed") == [] and gate.events(run_id, "lease.verified")

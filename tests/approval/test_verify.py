"""Approval verification from lineage (pure logic on SQLite)."""

from __future__ import annotations

from typing import Any

import payloads
import pytest

from airflow_finetune_gov.approval.verify import (
    ApprovalMissing,
    EvaluationMissing,
    evaluation_outcome,
    granted_approval,
)
from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    return s


def decide(store: LineageStore, env: str = "staging", dataset: str = "benign", **extra: Any) -> dict:
    d = payloads.decision(env, dataset, **extra)
    events.record(store, EventKey("d", "r", "policy_check", 1), "policy.decided", actor="policy", payload=d)
    events.record(store, EventKey("d", "r", "approval_gate", 1), "approval.requested", actor="policy",
                  payload=payloads.requested(d))
    return d


def grant(store: LineageStore, who: str, d: dict, *, witnessed: bool = True, comment: str = "looked at it") -> None:
    if witnessed:
        events.record(store, EventKey("d", "r", "approval_gate", 0), "approval.witnessed", actor="api-server",
                      payload=payloads.witnessed(who, comment=comment))
    events.record(store, EventKey("d", "r", "approval_gate", 1), "approval.granted", actor=who,
                  payload=payloads.grant(d, who, approval_id=f"id-{who}"))


def reject(store: LineageStore, who: str, d: dict) -> None:
    events.record(store, EventKey("d", "r", "approval_gate", 1), "approval.rejected", actor=who,
                  payload=payloads.rejection(d, who))


def test_no_decision_no_approval(store: LineageStore) -> None:
    with pytest.raises(ApprovalMissing, match="no recorded policy decision"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")


def test_single_tier_needs_an_allowed_approver(store: LineageStore) -> None:
    d = decide(store)
    with pytest.raises(ApprovalMissing, match="Marking the gate task successful does not approve"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    grant(store, "requester", d)  # a self-approval recorded somehow still does not count
    with pytest.raises(ApprovalMissing, match=r"recorded for decision [0-9a-f]{32}: none"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    grant(store, "approver1", d)
    ok = granted_approval(store.events(dag_id="d", run_id="r"), "r")
    assert ok["approvers"] == ["approver1"] and ok["dataset"] == "benign" and ok["target_environment"] == "staging"


def test_quorum_needs_distinct_people(store: LineageStore) -> None:
    d = decide(store, env="production")
    grant(store, "approver1", d)
    grant(store, "approver1", d)
    with pytest.raises(ApprovalMissing, match="needs 2 distinct approver"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    grant(store, "approver2", d)
    assert granted_approval(store.events(dag_id="d", run_id="r"), "r")["approvers"] == ["approver1", "approver2"]


def test_an_approver_taken_out_of_the_policy_since_the_decision_no_longer_counts(store: LineageStore) -> None:
    d = decide(store, env="production")
    grant(store, "approver1", d)
    grant(store, "approver2", d)
    events_now = store.events(dag_id="d", run_id="r")
    assert granted_approval(events_now, "r", ["approver1", "approver2"])["approvers"] == ["approver1", "approver2"]
    with pytest.raises(ApprovalMissing, match=r"no longer approvers under the current policy .*\['approver2'\]"):
        granted_approval(events_now, "r", ["approver1", "approver3"])  # approver2 out, approver3 in since
    with pytest.raises(ApprovalMissing, match="needs 2 distinct"):
        granted_approval(events_now, "r", [])


def test_where_the_policy_wants_a_reason_an_approval_without_one_does_not_count(store: LineageStore) -> None:
    d = decide(store, env="production")
    assert d["comment_required"] == ["Approve", "Reject"]  # the policy's, sealed in the decision
    grant(store, "approver1", d)
    grant(store, "approver2", d, comment="  ")  # the gate's own record may say otherwise: the witness decides
    with pytest.raises(ApprovalMissing, match=r"recorded for decision \w+: \['approver1'\]"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    staging = decide(store, env="staging")
    assert staging["comment_required"] == ["Reject"]
    grant(store, "approver2", staging, comment="")
    assert granted_approval(store.events(dag_id="d", run_id="r"), "r")["approvers"] == ["approver2"]


def test_one_rejection_rejects(store: LineageStore) -> None:
    d = decide(store)
    grant(store, "approver1", d)
    reject(store, "approver2", d)
    with pytest.raises(ApprovalMissing, match="rejected by approver2"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")


def test_an_approval_answers_only_the_decision_it_was_given_for(store: LineageStore) -> None:
    first = decide(store)
    grant(store, "approver1", first)
    assert granted_approval(store.events(dag_id="d", run_id="r"), "r")["decision_id"] == first["decision_id"]
    # The policy check runs again on an edited DAG: another dataset, other hyperparameters.
    second = decide(store, dataset="public_faq", hyperparameters={"epochs": 50})
    with pytest.raises(ApprovalMissing, match=r"1 approval\(s\) recorded in this run answered an earlier decision"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    grant(store, "approver2", second)
    ok = granted_approval(store.events(dag_id="d", run_id="r"), "r")
    assert ok["approvers"] == ["approver2"] and ok["dataset"] == "public_faq"
    assert ok["hyperparameters"] == {"epochs": 50}


def test_a_quorum_cannot_be_assembled_from_answers_to_two_decisions(store: LineageStore) -> None:
    grant(store, "approver1", decide(store, env="production"))
    grant(store, "approver2", decide(store, env="production"))  # same request, a new decision
    with pytest.raises(ApprovalMissing, match=r"recorded for decision \w+: \['approver2'\]"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")


def test_a_rejection_of_an_earlier_decision_does_not_reject_the_current_one(store: LineageStore) -> None:
    first = decide(store)
    reject(store, "approver2", first)
    grant(store, "approver1", decide(store))
    assert granted_approval(store.events(dag_id="d", run_id="r"), "r")["approvers"] == ["approver1"]


@pytest.mark.parametrize("change", [
    {"tier": "auto"},  # a decision edited after it was recorded
    {"decision_sha256": "0" * 64},
])
def test_a_decision_whose_content_does_not_match_its_hash_is_no_decision(store: LineageStore, change: dict) -> None:
    events.record(store, EventKey("d", "r", "policy_check", 1), "policy.decided", actor="policy",
                  payload={**payloads.decision(), **change})
    with pytest.raises(ApprovalMissing, match="no valid decision hash"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")


def evaluated(store: LineageStore, verdict: str, version: str = "v1", review: tuple[str, str] | None = None,
              *, witnessed: bool = True) -> None:
    events.record(store, EventKey("d", "r", "evaluate", 1), "evaluation.completed", actor="evaluation",
                  payload=payloads.evaluated(verdict, version))
    if review:
        events.record(store, EventKey("d", "r", "evaluate", 1), "evaluation.review_requested", actor="evaluation",
                      payload=payloads.review_requested())
    if review and witnessed:
        option = payloads.ACCEPT_REVIEW if review[1] == "accepted" else "Reject"
        events.record(store, EventKey("d", "r", "evaluate", 0), "approval.witnessed", actor="api-server",
                      payload=payloads.witnessed(review[0], option))
    if review:
        events.record(store, EventKey("d", "r", "evaluate", 1), "evaluation.reviewed", actor=review[0],
                      payload=payloads.reviewed(review[0], review[1]))


def test_promotion_needs_a_pass_for_the_same_version(store: LineageStore) -> None:
    decide(store)
    with pytest.raises(EvaluationMissing, match="no recorded evaluation"):
        evaluation_outcome(store.events(run_id="r"), "r", "v1")
    evaluated(store, "pass", version="v0")
    with pytest.raises(EvaluationMissing, match="of version v0, not v1"):
        evaluation_outcome(store.events(run_id="r"), "r", "v1")
    evaluated(store, "fail")
    with pytest.raises(EvaluationMissing, match="verdict fail"):
        evaluation_outcome(store.events(run_id="r"), "r", "v1")
    evaluated(store, "pass")
    assert evaluation_outcome(store.events(run_id="r"), "r", "v1")["reviewed_by"] is None


@pytest.mark.parametrize(("review", "error"), [
    (None, "needs_review for version v1, not reviewed"),
    (("approver1", "rejected"), "needs_review for version v1, rejected"),
    (("requester", "accepted"), "accepted by requester, who is not an eligible reviewer"),
    (("mallory", "accepted"), "accepted by mallory, who is not an eligible reviewer"),
])
def test_needs_review_counts_only_when_an_eligible_approver_accepts(
        store: LineageStore, review: tuple[str, str] | None, error: str) -> None:
    decide(store)
    evaluated(store, "needs_review", review=review)
    with pytest.raises(EvaluationMissing, match=error):
        evaluation_outcome(store.events(run_id="r"), "r", "v1")


def test_needs_review_accepted_by_an_approver_counts(store: LineageStore) -> None:
    decide(store)
    evaluated(store, "needs_review", review=("approver2", "accepted"))
    assert evaluation_outcome(store.events(run_id="r"), "r", "v1")["reviewed_by"] == "approver2"
    assert evaluation_outcome(store.events(run_id="r"), "r", "v1", ["approver2"])["reviewed_by"] == "approver2"
    with pytest.raises(EvaluationMissing, match="not an eligible reviewer"):  # taken out of the approvers since
        evaluation_outcome(store.events(run_id="r"), "r", "v1", ["approver1"])


def test_an_acceptance_nobody_was_seen_giving_does_not_count(store: LineageStore) -> None:
    """The review is recorded by the evaluation task (DAG-author reachable); the api-server's witness is not."""
    decide(store)
    evaluated(store, "needs_review", review=("approver2", "accepted"), witnessed=False)
    with pytest.raises(EvaluationMissing, match="not witnessed by the api-server"):
        evaluation_outcome(store.events(run_id="r"), "r", "v1")


def test_a_grant_counts_only_with_the_api_servers_witness(store: LineageStore) -> None:
    """Task code can append ``approval.granted`` through the control plane, but not the witness: a grant
    nobody was seen giving through Airflow's API does not approve, nor does a witness from before the
    decision (an answer to an earlier one)."""
    d = decide(store)
    grant(store, "approver1", d, witnessed=False)
    with pytest.raises(ApprovalMissing, match=r"not witnessed by the api-server .*\['approver1'\]"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    events.record(store, EventKey("d", "r", "approval_gate", 0), "approval.witnessed", actor="api-server",
                  payload=payloads.witnessed("approver2", "Reject"))
    grant(store, "approver2", d, witnessed=False)
    with pytest.raises(ApprovalMissing, match="not witnessed"):  # witnessed rejecting, not approving
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    events.record(store, EventKey("d", "r", "approval_gate", 0), "approval.witnessed", actor="api-server",
                  payload=payloads.witnessed("approver1"))
    assert granted_approval(store.events(dag_id="d", run_id="r"), "r")["approvers"] == ["approver1"]
    d2 = decide(store)  # a new decision: the witnessed answer was to the old one
    grant(store, "approver1", d2, witnessed=False)
    with pytest.raises(ApprovalMissing, match=r"not witnessed .*\['approver1'\]"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")


def test_an_approve_counts_only_for_a_request_the_gate_opened_for_the_decision(store: LineageStore) -> None:
    """The witness names the request answered (the hash of what Airflow showed): an Approve given to a DAG
    author's own HITL task, or to the gate's request with an altered summary, is not an approval."""
    d = decide(store)  # the gate's request: payloads.REQUEST
    events.record(store, EventKey("d", "r", "lunch_order", 0), "approval.witnessed", actor="api-server",
                  payload=payloads.witnessed("approver1", request_sha256="ee" * 32))
    events.record(store, EventKey("d", "r", "approval_gate", 1), "approval.granted", actor="approver1",
                  payload=payloads.grant(d, "approver1"))
    with pytest.raises(ApprovalMissing, match=r"Approve given to another request .*\['approver1'\]"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")
    events.record(store, EventKey("d", "r", "approval_gate", 0), "approval.witnessed", actor="api-server",
                  payload=payloads.witnessed("approver1"))
    assert granted_approval(store.events(dag_id="d", run_id="r"), "r")["approvers"] == ["approver1"]
    # a request rendered for an earlier decision is not one for the latest
    d2 = decide(store, rows=13)
    events.record(store, EventKey("d", "r", "approval_gate", 1), "approval.granted", actor="approver1",
                  payload=payloads.grant(d2, "approver1"))
    events.record(store, EventKey("d", "r", "approval_gate", 0), "approval.witnessed", actor="api-server",
                  payload=payloads.witnessed("approver1", request_sha256="ee" * 32))
    with pytest.raises(ApprovalMissing, match="Approve given to another request"):
        granted_approval(store.events(dag_id="d", run_id="r"), "r")


def test_a_review_counts_only_for_the_review_request_of_that_evaluation(store: LineageStore) -> None:
    decide(store)
    events.record(store, EventKey("d", "r", "evaluate", 1), "evaluation.completed", actor="evaluation",
                  payload=payloads.evaluated("needs_review", "v1"))
    events.record(store, EventKey("d", "r", "evaluate", 1), "evaluation.review_requested", actor="evaluation",
                  payload=payloads.review_requested())
    events.record(store, EventKey("d", "r", "decoy", 0), "approval.witnessed", actor="api-server",
                  payload=payloads.witnessed("approver1", payloads.ACCEPT_REVIEW, request_sha256="ee" * 32))
    events.record(store, EventKey("d", "r", "evaluate", 1), "evaluation.reviewed", actor="approver1",
                  payload=payloads.reviewed("approver1", "accepted"))
    with pytest.raises(EvaluationMissing, match="to the review request opened for it"):
        evaluation_outcome(store.events(dag_id="d", run_id="r"), "r", "v1")
    events.record(store, EventKey("d", "r", "evaluate", 0), "approval.witnessed", actor="api-server",
                  payload=payloads.witnessed("approver1", payloads.ACCEPT_REVIEW))
    assert evaluation_outcome(store.events(dag_id="d", run_id="r"), "r", "v1")["reviewed_by"] == "approver1"

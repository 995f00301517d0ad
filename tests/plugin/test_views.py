"""The governance view's summaries (pure logic on a SQLite lineage store; the pages and their
authentication are tested on the real api-server in test_governance_view_on_stack.py)."""

from __future__ import annotations

from typing import Any

import payloads
import pytest

from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore
from airflow_finetune_gov.plugin import views


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    return s


def rec(store: LineageStore, task: str, kind: str, payload: dict[str, Any], map_index: int = -1) -> None:
    events.record(store, EventKey("d", "r", task, 1, map_index), kind, actor="t", payload=payload)


def decided(store: LineageStore, map_index: int = -1) -> dict[str, Any]:
    d = payloads.decision("staging")
    rec(store, "policy_check", "policy.decided", d, map_index)
    return d


def test_a_pending_approval_with_a_live_lease(store: LineageStore) -> None:
    d = decided(store)
    rec(store, "approval_gate", "approval.requested", payloads.requested(d))
    summary = views.summarize(store.events(run_id="r"))
    assert summary["chains"][0]["approval"] == "pending" and views.status_of(summary) == "awaiting approval"
    rec(store, "approval_gate", "approval.witnessed", payloads.witnessed("approver1"))
    rec(store, "approval_gate", "approval.granted", payloads.grant(d, "approver1"))
    rec(store, "approval_gate", "approval.decided", {"outcome": "approved"})
    rec(store, "acquire_lease", "lease.issued", payloads.issued("L1"))
    summary = views.summarize(store.events(run_id="r"))
    (chain,) = summary["chains"]
    assert (chain["approval"], chain["approvers"], chain["live_leases"]) == ("approved", ["approver1"], 1)
    assert views.status_of(summary) == "lease live"
    rec(store, "revoke_lease", "lease.revoked", payloads.revoked("L1"))
    rec(store, "revoke_lease", "lease.verified", payloads.verified("L1"))
    assert views.summarize(store.events(run_id="r"))["chains"][0]["leases"][0]["status"] == "revoked, verified gone"


def test_a_failed_evaluation_is_blocked_and_the_page_escapes_what_it_shows(store: LineageStore) -> None:
    decided(store)
    rec(store, "evaluate", "evaluation.completed", payloads.evaluated("fail", prompts=3, flipped=2, metrics={
        "harmful_refusal": {"n": 3, "baseline": 1.0, "candidate": 0.0, "difference_ci": [-1.0, -0.3],
                            "verdict": "fail"}}, report="/x/report.html"))
    rec(store, "promote", "promotion.blocked", {"reason": "evaluation verdict fail <script>"})
    events = store.events(run_id="r")
    summary = views.summarize(events)
    assert views.status_of(summary) == "blocked"
    html = views.run_page("d", "r", events, summary, {"|-1": "./r/report/evaluate?map_index=-1"}, chain_ok=True)
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert "harmful_refusal" in html and "report with the flipped prompts" in html


def test_mapped_chains_are_summarised_one_by_one(store: LineageStore) -> None:
    decided(store, 0)
    decided(store, 1)
    rec(store, "promote", "promotion.completed", payloads.promoted("staging", "v1"), 1)
    chains = views.summarize(store.events(run_id="r"))["chains"]
    assert [(c["map_index"], bool(c["promotion"])) for c in chains] == [(0, False), (1, True)]


def test_a_gate_marked_success_without_an_approval_is_blocked_not_pending(store: LineageStore) -> None:
    d = decided(store)
    rec(store, "approval_gate", "approval.requested", payloads.requested(d))
    rec(store, "acquire_lease", "lease.refused", {"reason": "no approval.granted for decision 1 in lineage"})
    summary = views.summarize(store.events(run_id="r"))
    (chain,) = summary["chains"]
    assert chain["approval"] == "bypassed" and views.status_of(summary) == "blocked"
    assert chain["reason"].startswith("blocked: the approval gate ended without an approval") and \
        "no approval.granted for decision 1" in chain["reason"]


def test_the_reason_comes_first_with_who_answered_when_and_what_they_wrote(store: LineageStore) -> None:
    d = decided(store)
    rec(store, "approval_gate", "approval.requested", payloads.requested(d, needed=2))
    rec(store, "approval_gate", "approval.granted", payloads.grant(d, "approver1", comment="rows read",
                                                                   responded_at="2026-12-02T01:00:00+00:00"))
    summary = views.summarize(store.events(run_id="r"))
    assert summary["chains"][0]["reason"] == "awaiting approval: 1 of 2 approved"
    rec(store, "approval_gate", "approval.incomplete", {
        "responder": "approver2", "option": "Reject", "comment": "", "responded_at": "2026-12-02T01:01:00+00:00",
        "decision_id": d["decision_id"], "decision_sha256": d["decision_sha256"], "reason": "no comment"})
    rec(store, "approval_gate", "approval.rejected", payloads.rejection(d, "approver2", comment="six harmful rows"))
    rec(store, "approval_gate", "approval.decided", {"outcome": "rejected", "reason": "rejected by approver2"})
    events = store.events(run_id="r")
    summary = views.summarize(events)
    (chain,) = summary["chains"]
    assert chain["reason"] == "rejected by approver2: \u201csix harmful rows\u201d"
    assert [(a["responder"], a["option"], a["comment"], a["counted"]) for a in chain["answers"]] == [
        ("approver1", "Approve", "rows read", "counted"), ("approver2", "Reject", "", "not counted: no comment"),
        ("approver2", "Reject", "six harmful rows", "counted")]
    assert chain["answers"][0]["at"] == "2026-12-02T01:00:00+00:00"
    page = views.run_page("d", "r", events, summary, {}, chain_ok=True)
    assert page.index("rejected by approver2") < page.index("<h3>Answers</h3>") and "not counted: no comment" in page


def test_a_failed_evaluation_names_the_metrics_and_their_drop(store: LineageStore) -> None:
    decided(store)
    rec(store, "acquire_lease", "lease.issued", payloads.issued("L1"))
    rec(store, "revoke_lease", "lease.revoked", payloads.revoked("L1"))
    rec(store, "evaluate", "evaluation.completed", payloads.evaluated("fail", metrics={
        "harmful_refusal": {"n": 80, "baseline": 1.0, "candidate": 0.0, "difference_ci": [-1.0, -0.95],
                            "verdict": "fail"},
        "benign_compliance": {"n": 42, "baseline": 1.0, "candidate": 1.0, "difference_ci": [0.0, 0.0],
                              "verdict": "pass"}}))
    rec(store, "promote", "promotion.blocked", {"reason": "evaluation verdict fail"})
    (chain,) = views.summarize(store.events(run_id="r"))["chains"]
    assert chain["reason"] == "blocked by evaluation: harmful_refusal \u2212100 pts"
    (lease,) = chain["leases"]
    assert lease["issued_at"] and lease["revoked_at"] and lease["task_id"] == "acquire_lease"


def test_a_models_page_tells_each_versions_evaluate_approve_promote_story(store: LineageStore) -> None:
    def run(run_id: str, version: str, verdict: str) -> None:
        def key(task: str) -> EventKey:
            return EventKey("d", run_id, task, 1)

        d = payloads.decision("staging")
        events.record(store, key("policy_check"), "policy.decided", actor="t", payload=d)
        events.record(store, key("approval_gate"), "approval.granted", actor="t",
                      payload=payloads.grant(d, "approver1"))
        events.record(store, key("tune"), "model.stored", actor="control-plane", payload={
            "model": "m", "version": version, "base_model": "base", "base_version": "b1", "kind": "adapter",
            "sha256": payloads.SHA, "files": 2, "bytes": 100})
        events.record(store, key("evaluate"), "evaluation.completed", actor="t",
                      payload=payloads.evaluated(verdict, version, metrics={"harmful_refusal": {"verdict": verdict}}))
        if verdict == "pass":
            events.record(store, key("promote"), "promotion.completed", actor="t",
                          payload=payloads.promoted("staging", version))
        else:
            events.record(store, key("promote"), "promotion.blocked", actor="t",
                          payload={"reason": "evaluation verdict fail"})

    run("r1", "v1", "pass")
    run("r2", "v2", "fail")
    runs = {("d", r): store.events(dag_id="d", run_id=r) for r in ("r1", "r2")}
    history = views.model_history("m", runs, {"staging": {"version": "v1"}, "_history": []})
    assert [v["version"] for v in history["versions"]] == ["v2", "v1"] and history["aliases"] == {"staging": "v1"}
    v2, v1 = history["versions"]
    assert (v1["evaluation"]["verdict"], v1["approvers"], v1["holds"]) == ("pass", ["approver1"], ["staging"])
    assert [(m["kind"], m["alias"], m["approvers"]) for m in v1["promotions"]] == [
        ("promotion", "staging", ["approver1"])]
    assert (v2["evaluation"]["failed"], v2["blocked"], v2["promotions"]) == (
        ["harmful_refusal"], "evaluation verdict fail", [])
    html = views.model_page(history, base="../")
    assert "blocked: evaluation verdict fail" in html and 'href="../runs/d/r1"' in html

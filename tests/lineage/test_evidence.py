"""The evidence pack's judgements on recorded runs (SQLite: pure logic; a real demo run is judged on the
stack in tests/integration/test_governed_run.py)."""

from __future__ import annotations

from typing import Any

import payloads
import pytest
from sqlalchemy import text

from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage.evidence import evidence, render_html
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore

SHA = "ab" * 32


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    return s


def governed_run(store: LineageStore, run: str = "r", *, responder: str = "approver1", trained_sha: str = SHA,
                 verified: bool = True, verdict: str = "pass", review: tuple[str, str] | None = None,
                 promote: bool | None = None, signed: bool = True, group: str = "", map_index: int = -1) -> None:
    def rec(task: str, kind: str, payload: dict[str, Any]) -> None:
        events.record(store, EventKey("d", run, f"{group}{task}", 1, map_index), kind, actor="t", payload=payload)

    d = payloads.decision(sha256=SHA)
    rec("policy_check", "policy.decided", d)
    rec("approval_gate", "approval.requested", payloads.requested(d))
    rec("approval_gate", "approval.witnessed", payloads.witnessed(responder))
    rec("approval_gate", "approval.granted", payloads.grant(d, responder, approval_id="a1"))
    rec("acquire_lease", "lease.issued", payloads.issued("L1"))
    rec("tune", "tuning.completed", payloads.tuned("v1", content_sha256=trained_sha))
    rec("revoke_lease", "lease.revoked", payloads.revoked("L1"))
    if verified:
        rec("revoke_lease", "lease.verified", payloads.verified("L1"))
    rec("evaluate", "evaluation.started", payloads.evaluation_started("e1", suites={"harmful": SHA}))
    rec("evaluate", "evaluation.completed", payloads.evaluated(verdict, "v1", suites={"harmful": SHA}, prompts=480))
    if review:
        rec("evaluate", "evaluation.review_requested", payloads.review_requested("e1"))
        ev = payloads.witnessed(review[0], payloads.ACCEPT_REVIEW if review[1] == "accepted" else "Reject")
        events.record(store, EventKey("d", run, f"{group}evaluate", 0, map_index), "approval.witnessed",
                      actor="api-server", payload=ev)
        rec("evaluate", "evaluation.reviewed", payloads.reviewed(review[0], review[1]))
    if promote if promote is not None else verdict == "pass":
        if signed:
            rec("promote", "provenance.verified", payloads.provenance_verified("v1", invocation_id=f"d/{run}"))
        rec("promote", "promotion.completed", payloads.promoted("staging", "v1"))
    else:
        rec("promote", "promotion.blocked", {"reason": f"evaluation verdict {verdict}"})


def statuses(pack: dict[str, Any]) -> dict[str, str]:
    out = {c["id"]: c["status"] for c in pack["controls"]}
    for chain in pack["chains"]:
        out.update({c["id"]: c["status"] for c in chain["controls"]})
    return out


def test_a_governed_run_meets_every_control(store: LineageStore) -> None:
    governed_run(store)
    pack = evidence(store.events(run_id="r"))
    assert pack["ok"] and set(statuses(pack).values()) == {"met"}
    approval = next(c for c in pack["chains"][0]["controls"] if c["id"] == "approval")
    assert "approved by approver1 (1 of 1 needed); requester requester" in approval["detail"]
    assert approval["events"] and "NIST CSF 2.0 PR.AA-05 (separation of duties)" in approval["references"]
    page = render_html(pack)
    assert "every control met or not applicable" in page and "OWASP NHI1 (improper offboarding)" in page


@pytest.mark.parametrize(("change", "control"), [
    ({"responder": "requester"}, "approval"),            # self-approval recorded
    ({"trained_sha": "cd" * 32}, "data_integrity"),       # trained on other content than approved
    ({"verified": False}, "revocation"),                  # revoked but never proven gone
    ({"signed": False}, "promotion_gate"),                # promoted without verified provenance
])
def test_each_broken_control_is_named(store: LineageStore, change: dict[str, Any], control: str) -> None:
    governed_run(store, **change)
    pack = evidence(store.events(run_id="r"))
    assert not pack["ok"] and [k for k, v in statuses(pack).items() if v == "not met"] == [control]


@pytest.mark.parametrize(("screening", "status", "detail"), [
    ({"flagged": 2, "flagged_ids": [3, 5], "flagged_share": 0.1667}, "met", "2 of 12 rows flagged (17%)"),
    ({"status": "unavailable", "screened": 0, "reason": "base model 'gpt-x' is not in the model store"}, "not met",
     "not screened: base model 'gpt-x' is not in the model store"),
    ({"status": "disabled", "screened": 0, "reason": "screening.enabled is false"}, "n/a", "disabled"),
    (None, "not met", "no screening of the training data is recorded"),
])
def test_the_screening_of_the_training_data_is_judged(store: LineageStore, screening: dict[str, Any] | None,
                                                      status: str, detail: str) -> None:
    base = payloads.decision(sha256=SHA)["screening"]
    d = payloads.decision(sha256=SHA, screening={**base, **screening} if screening else None)
    events.record(store, EventKey("d", "s", "policy_check", 1, -1), "policy.decided", actor="t", payload=d)
    control = next(c for c in evidence(store.events(run_id="s"))["chains"][0]["controls"]
                   if c["id"] == "data_screening")
    assert control["status"] == status and detail in control["detail"], control
    assert "OWASP LLM04:2025 (data and model poisoning)" in control["references"]


@pytest.mark.parametrize(("review", "status"), [
    (("approver2", "accepted"), "met"),        # needs_review, accepted by an eligible approver
    (("requester", "accepted"), "not met"),    # ... by the requester: does not count
    (("approver2", "rejected"), "not met"),
    (None, "not met"),                          # never reviewed
])
def test_a_promotion_after_needs_review_counts_only_with_an_eligible_acceptance(
        store: LineageStore, review: tuple[str, str] | None, status: str) -> None:
    governed_run(store, verdict="needs_review", review=review, promote=True)
    pack = evidence(store.events(run_id="r"))
    gate = next(c for c in pack["chains"][0]["controls"] if c["id"] == "promotion_gate")
    assert gate["status"] == status, gate
    if status == "met":
        assert "after verdict needs_review, accepted by approver2" in gate["detail"]


def test_a_blocked_promotion_is_the_gate_working(store: LineageStore) -> None:
    governed_run(store, verdict="fail")
    assert statuses(evidence(store.events(run_id="r")))["promotion_gate"] == "met"


def test_an_edited_row_breaks_lineage_integrity(store: LineageStore) -> None:
    governed_run(store)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE fgov_lineage_event SET actor = 'mallory' WHERE id = 3"))
    pack = evidence(store.events(run_id="r"))
    integrity = next(c for c in pack["controls"] if c["id"] == "lineage_integrity")
    assert integrity["status"] == "not met"
    assert "event 3 (approval.witnessed): content does not match its hash" in integrity["detail"]


def test_mapped_chains_are_judged_one_by_one(store: LineageStore) -> None:
    governed_run(store, group="per.chain.", map_index=0)
    governed_run(store, group="per.chain.", map_index=1, responder="requester")
    pack = evidence(store.events(run_id="r"))
    by_chain = {ch["map_index"]: {c["id"]: c["status"] for c in ch["controls"]} for ch in pack["chains"]}
    assert by_chain[0]["approval"] == "met" and by_chain[1]["approval"] == "not met"
    with pytest.raises(ValueError, match="no lineage events"):
        evidence([])

"""Check a run's approval from the lineage record (pure; no Airflow import).

Nothing downstream of the gate trusts the gate task's state or XCom: a ``user`` can mark the gate
task ``success`` over REST or in the UI, and XCom can be written through the API. The lineage record
is written only by the governed tasks' own code, is append-only, and is chained by hash; an approval
counts only if it is recorded there, by an allowed approver who is not the requester, with the
tier's quorum of distinct people and no rejection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_finetune_gov.lineage.store import LineageEvent


class ApprovalMissing(RuntimeError):
    pass


def _of(events: Sequence[LineageEvent], event_type: str) -> list[dict[str, Any]]:
    return [e.payload_dict() for e in events if e.event_type == event_type]


def policy_decision(events: Sequence[LineageEvent], run_id: str) -> dict[str, Any]:
    """The policy decision among ``events`` (one run's, or one governed chain's within a run)."""
    decided = _of(events, "policy.decided")
    if not decided:
        raise ApprovalMissing(f"run {run_id} has no recorded policy decision: the policy check did not run")
    return decided[-1]


def granted_approval(events: Sequence[LineageEvent], run_id: str) -> dict[str, Any]:
    decision = policy_decision(events, run_id)
    tier = decision["tier"]
    if tier == "deny":
        raise ApprovalMissing(f"run {run_id} was denied by policy: {'; '.join(decision['reasons'])}")
    rejected = _of(events, "approval.rejected")
    if rejected:
        raise ApprovalMissing(f"run {run_id} was rejected by {rejected[-1].get('responder')}")
    grants = _of(events, "approval.granted")
    requester = decision["request"]["requester"]
    if tier == "auto":
        auto = [g for g in grants if g.get("responder") == "policy" and g.get("policy_sha256") ==
                decision["policy_sha256"]]
        if not auto:
            raise ApprovalMissing(f"run {run_id}: tier auto, but no policy approval is recorded")
        approvers: list[str] = []
        approval_id = auto[-1]["approval_id"]
    else:
        allowed = set(decision["approvers"]) - {requester}
        valid = [g for g in grants if g.get("responder") in allowed]
        approvers = sorted({g["responder"] for g in valid})
        if len(approvers) < int(decision["quorum"]):
            raise ApprovalMissing(
                f"run {run_id} needs {decision['quorum']} distinct approver(s) from {sorted(allowed)}; "
                f"recorded: {approvers or 'none'}. Marking the gate task successful does not approve a run."
            )
        approval_id = valid[-1]["approval_id"]
    return {
        "approval_id": approval_id,
        "tier": tier,
        "approvers": approvers,
        "requester": requester,
        "change": decision["request"].get("change", "finetune"),
        "rollback_to": decision["request"].get("rollback_to") or None,
        "base_version": decision["request"].get("base_version") or None,
        "dataset": decision["request"]["dataset"],
        "dataset_table": decision["dataset_table"],
        "target_environment": decision["request"]["target_environment"],
        "model": decision["request"]["model"],
        "policy_sha256": decision["policy_sha256"],
        "dataset_digest": decision.get("dataset"),  # {"uri", "rows", "sha256"} as approved, or None
        "hyperparameters": decision.get("hyperparameters"),
    }


class EvaluationMissing(RuntimeError):
    pass


def evaluation_outcome(events: Sequence[LineageEvent], run_id: str, version: str) -> dict[str, Any]:
    """The evaluation that lets ``version`` be promoted: the last recorded one, for that version, with
    verdict ``pass``, or ``needs_review`` accepted by an eligible reviewer (an approver of the run's
    policy decision who is not its requester) in a recorded review of that evaluation."""
    evals = _of(events, "evaluation.completed")
    if not evals:
        raise EvaluationMissing(f"run {run_id} has no recorded evaluation")
    last = evals[-1]
    if last.get("version") != version:
        raise EvaluationMissing(f"run {run_id}: the last evaluation is of version {last.get('version')}, not {version}")
    if last["verdict"] == "pass":
        return {**last, "reviewed_by": None}
    if last["verdict"] != "needs_review":
        raise EvaluationMissing(f"run {run_id}: evaluation verdict {last['verdict']} for version {version}")
    decision = policy_decision(events, run_id)
    eligible = set(decision["approvers"]) - {decision["request"]["requester"]}
    reviews = [r for r in _of(events, "evaluation.reviewed") if r.get("evaluation_id") == last.get("evaluation_id")]
    if not reviews or reviews[-1].get("outcome") != "accepted":
        outcome = reviews[-1].get("outcome") if reviews else "not reviewed"
        raise EvaluationMissing(f"run {run_id}: evaluation verdict needs_review for version {version}, {outcome}")
    if reviews[-1].get("responder") not in eligible:
        raise EvaluationMissing(f"run {run_id}: the review was accepted by {reviews[-1].get('responder')}, who is "
                                f"not an eligible reviewer ({sorted(eligible)})")
    return {**last, "reviewed_by": reviews[-1]["responder"]}

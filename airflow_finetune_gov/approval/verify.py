"""Check a run's approval from the lineage record (pure; no Airflow import).

Nothing downstream of the gate trusts the gate task's state or XCom: a ``user`` can mark the gate
task ``success`` over REST or in the UI, and XCom can be written through the API. The lineage record
is append-only and chained by hash; an approval counts only if it is recorded there, by an allowed
approver who is not the requester, with the tier's quorum of distinct people and no rejection, and only
if the api-server **witnessed** that person answering Approve through Airflow's API after the decision
(``approval.witnessed``). Task code can append a grant through the control plane, but never a witness
nor a decision (both are reserved to the deployment's own components).

An approval answers one **decision**: every ``policy.decided`` carries a ``decision_id`` and a
``decision_sha256`` over its whole content (request, tier, approvers, dataset digest,
hyperparameters, policy hash), and every answer names the hash it answered. Only the run's latest
decision governs it, and only answers to that decision count: a policy check cleared and re-run on
an edited DAG (another dataset, other hyperparameters) makes a new decision that nobody has answered.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_finetune_gov.lineage.store import LineageEvent


APPROVE, REJECT = "Approve", "Reject"  # the gate's options (approval.operators)
ACCEPT_REVIEW = "Accept and allow promotion"  # the evaluation review's accepting option (evaluation.operators)


class ApprovalMissing(RuntimeError):
    pass


def _of(events: Sequence[LineageEvent], event_type: str) -> list[dict[str, Any]]:
    return [e.payload_dict() for e in events if e.event_type == event_type]


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "decision_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def seal_decision(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` (a decision about to be recorded) with its ``decision_id`` and ``decision_sha256``."""
    sealed = {**record, "decision_id": uuid.uuid4().hex}
    sealed["decision_sha256"] = _digest(sealed)
    return sealed


def answered(decision: dict[str, Any]) -> dict[str, str]:
    """What an answer records to name the decision it answers."""
    return {"decision_id": decision["decision_id"], "decision_sha256": decision["decision_sha256"]}


def answers_to(events: Sequence[LineageEvent], event_type: str, decision: dict[str, Any]) -> list[dict[str, Any]]:
    """The payloads of ``event_type`` (grants, rejections) that answer ``decision`` (its id and hash)."""
    return [p for p in _of(events, event_type) if p.get("decision_sha256") == decision.get("decision_sha256")
            and p.get("decision_id") == decision.get("decision_id")]


def policy_decision(events: Sequence[LineageEvent], run_id: str) -> dict[str, Any]:
    """The policy decision among ``events`` (one run's, or one governed chain's within a run): the
    latest one, whose content must still hash to its ``decision_sha256``."""
    decided = _of(events, "policy.decided")
    if not decided:
        raise ApprovalMissing(f"run {run_id} has no recorded policy decision: the policy check did not run")
    last = decided[-1]
    if "decision_sha256" not in last or _digest(last) != last["decision_sha256"]:
        raise ApprovalMissing(f"run {run_id}: the recorded policy decision has no valid decision hash (recorded "
                              "by an older version of the provider, or altered): run the policy check again")
    return last


def request_sha256(subject: str, body: str | None, options: Sequence[str]) -> str:
    """The hash of a HITL request as an approver sees it: what the gate records when it opens the request and
    the api-server's witness computes from Airflow's row when the request is answered."""
    shown = json.dumps({"subject": subject, "body": body or "", "options": list(options)}, sort_keys=True,
                       separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(shown.encode()).hexdigest()


def _witnessed(events: Sequence[LineageEvent], option: str, after: int, requests: set[str], *,
               need_comment: bool = False) -> set[str]:
    return {str(p.get("responder")) for e in events if e.event_type == "approval.witnessed" and e.id > after
            and option in (p := e.payload_dict()).get("chosen_options", []) and p.get("request_sha256") in requests
            and (not need_comment or str(p.get("comment") or "").strip())}


def witnessed_answers(events: Sequence[LineageEvent]) -> list[LineageEvent]:
    """Every answer given through Airflow's API after the latest policy decision, to a request rendered for that
    decision, as the api-server witnessed it (``approval.witnessed`` events, which only the api-server records),
    in order: what people answered, whatever the gate (a task) made of it."""
    decided = [e for e in events if e.event_type == "policy.decided"]
    if not decided:
        return []
    requests = {str(p["request_sha256"]) for p in answers_to(events, "approval.requested", decided[-1].payload_dict())
                if p.get("request_sha256")}
    return [e for e in events if e.event_type == "approval.witnessed" and e.id > decided[-1].id
            and e.payload_dict().get("request_sha256") in requests]


def witnessed_approvals(events: Sequence[LineageEvent]) -> set[str]:
    """Who answered ``Approve`` (:func:`witnessed_answers`): an ``approval.granted`` counts only for one of them.
    A grant is the gate's reading of an answer; the witness is the answer. Where the decision requires a comment
    with an approval (``comment_required``: the policy's, for the change's environment), only answers with one."""
    decided = [e for e in events if e.event_type == "policy.decided"]
    if not decided:
        return set()
    need_comment = APPROVE in (decided[-1].payload_dict().get("comment_required") or [])
    answers = [e.payload_dict() for e in witnessed_answers(events)]
    return {str(p.get("responder")) for p in answers if APPROVE in p.get("chosen_options", [])
            and (not need_comment or str(p.get("comment") or "").strip())}


def granted_approval(events: Sequence[LineageEvent], run_id: str,
                     current_approvers: Collection[str] | None = None) -> dict[str, Any]:
    """The run's approval, as the record proves it: the latest decision, approved by enough distinct approvers
    it names, each answer witnessed by the api-server. With ``current_approvers`` (the policy's approvers now),
    an approver the policy no longer names does not count: taking someone out of the approvers withdraws what
    they have not yet had used."""
    decision = policy_decision(events, run_id)
    tier = decision["tier"]
    if tier == "deny":
        raise ApprovalMissing(f"run {run_id} was denied by policy: {'; '.join(decision['reasons'])}")
    rejected = answers_to(events, "approval.rejected", decision)
    if rejected:
        raise ApprovalMissing(f"run {run_id} was rejected by {rejected[-1].get('responder')}")
    grants = answers_to(events, "approval.granted", decision)
    earlier = len(_of(events, "approval.granted")) - len(grants)
    stale = (f"; {earlier} approval(s) recorded in this run answered an earlier decision, and an approval answers "
             "only the decision it was given for") if earlier else ""
    requester = decision["request"]["requester"]
    if tier == "auto":
        auto = [g for g in grants if g.get("responder") == "policy" and g.get("policy_sha256") ==
                decision["policy_sha256"]]
        if not auto:
            raise ApprovalMissing(f"run {run_id}: tier auto, but no policy approval is recorded for decision "
                                  f"{decision['decision_id']}{stale}")
        approvers: list[str] = []
        approval_id = auto[-1]["approval_id"]
    else:
        allowed = set(decision["approvers"]) - {requester}
        removed = sorted(allowed - set(current_approvers)) if current_approvers is not None else []
        allowed -= set(removed)
        seen = witnessed_approvals(events)
        valid = [g for g in grants if g.get("responder") in allowed and g.get("responder") in seen]
        unwitnessed = sorted({str(g.get("responder")) for g in grants if g.get("responder") not in seen})
        elsewhere = sorted({str(w.get("responder")) for w in _of(events, "approval.witnessed")
                            if APPROVE in w.get("chosen_options", [])} - seen)
        approvers = sorted({g["responder"] for g in valid})
        if len(approvers) < int(decision["quorum"]):
            hint = (f"; recorded but not witnessed by the api-server (no answer through Airflow's API after the "
                    f"decision to a request the gate opened for it): {unwitnessed}" if unwitnessed else "")
            if removed:
                hint += f"; no longer approvers under the current policy (taken out since the decision): {removed}"
            if elsewhere:
                hint += (f"; Approve given to another request (not one the gate opened for this decision, or "
                         f"before it): {elsewhere}")
            raise ApprovalMissing(
                f"run {run_id} needs {decision['quorum']} distinct approver(s) from {sorted(allowed)}; "
                f"recorded for decision {decision['decision_id']}: {approvers or 'none'}{stale}{hint}. Marking the "
                "gate task successful does not approve a run."
            )
        approval_id = valid[-1]["approval_id"]
    return {
        "approval_id": approval_id,
        **answered(decision),
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


def evaluation_outcome(events: Sequence[LineageEvent], run_id: str, version: str,
                       current_approvers: Collection[str] | None = None) -> dict[str, Any]:
    """The evaluation that lets ``version`` be promoted: the last recorded one, for that version, with
    verdict ``pass``, or ``needs_review`` accepted by an eligible reviewer (an approver of the run's
    policy decision who is not its requester, and, given ``current_approvers``, still an approver) in a
    recorded review of that evaluation."""
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
    if current_approvers is not None:
        eligible &= set(current_approvers)
    reviews = [r for r in _of(events, "evaluation.reviewed") if r.get("evaluation_id") == last.get("evaluation_id")]
    if not reviews or reviews[-1].get("outcome") != "accepted":
        outcome = reviews[-1].get("outcome") if reviews else "not reviewed"
        raise EvaluationMissing(f"run {run_id}: evaluation verdict needs_review for version {version}, {outcome}")
    if reviews[-1].get("responder") not in eligible:
        raise EvaluationMissing(f"run {run_id}: the review was accepted by {reviews[-1].get('responder')}, who is "
                                f"not an eligible reviewer ({sorted(eligible)})")
    completed = [e.id for e in events if e.event_type == "evaluation.completed"][-1]
    requests = {str(p["request_sha256"]) for p in _of(events, "evaluation.review_requested")
                if p.get("evaluation_id") == last.get("evaluation_id") and p.get("request_sha256")}
    if reviews[-1].get("responder") not in _witnessed(events, ACCEPT_REVIEW, completed, requests):
        raise EvaluationMissing(f"run {run_id}: the review accepted by {reviews[-1].get('responder')} was not "
                                "witnessed by the api-server (no answer through Airflow's API, after the evaluation, "
                                "to the review request opened for it)")
    return {**last, "reviewed_by": reviews[-1]["responder"]}

"""FineTuneApprovalOperator: Airflow Human-in-the-loop, plus what it lacks for governed changes."""

from __future__ import annotations

import uuid
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval.verify import ApprovalMissing, policy_decision

APPROVE, REJECT = "Approve", "Reject"


class FineTuneApprovalOperator(HITLOperator):
    """Ask the policy's approvers, minus the requester and the DAG's owners, to approve the change.

    - The request body is the change summary an approver needs (model, dataset, classification,
      tier and the policy's reasons, requester, lineage link).
    - ``assigned_users`` is the approver group minus the requester, so Airflow itself answers the
      requester's own approval with 403; the responder is checked again here, and a forbidden answer is
      recorded as a violation and does not count.
    - No default option: when ``response_timeout`` passes, the request fails closed (never approves).
    - Tier ``auto``: no human; the recorded policy decision is the approval.
    - Every request and answer goes to lineage; downstream tasks verify approval from lineage only.
    """

    ui_color = "#fff4e5"

    def __init__(self, *, subject: str = "Approve a governed fine-tune", **kwargs: Any) -> None:
        kwargs.setdefault("options", [APPROVE, REJECT])
        kwargs.setdefault("defaults", None)
        super().__init__(subject=subject, **kwargs)

    def _excluded(self, context: Any) -> set[str]:
        owners = {o.strip() for o in str(getattr(context["dag"], "owner", "") or "").split(",") if o.strip()}
        owners.discard("airflow")  # Airflow's placeholder owner is not a person
        return {common.requester(context), *owners}

    def execute(self, context: Any) -> Any:
        ti = context["ti"]
        try:
            decision = policy_decision(common.lineage_store(), ti.dag_id, ti.run_id)
        except ApprovalMissing as exc:
            raise AirflowFailException(str(exc)) from exc
        if decision["tier"] == "auto":
            common.record(context, "approval.granted", {
                "approval_id": uuid.uuid4().hex, "responder": "policy", "option": APPROVE,
                "tier": "auto", "policy_sha256": decision["policy_sha256"],
            }, actor="policy")
            self.log.info("tier auto: approved by policy %s", decision["policy_sha256"][:12])
            return {"chosen_options": [APPROVE], "responded_by_user": {"id": "policy", "name": "policy"}}
        if decision["tier"] != "single":
            raise AirflowFailException(
                f"tier {decision['tier']!r} needs {decision['quorum']} distinct approvers; this gate collects one "
                "answer per run so far - use a policy rule with tier single for this change, or wait for "
                "quorum support"
            )
        excluded = self._excluded(context)
        approvers = [a for a in decision["approvers"] if a not in excluded]
        if not approvers:
            common.record(context, "approval.rejected", {"responder": "policy", "reason": "no eligible approver"},
                          actor="policy")
            raise AirflowFailException(f"no eligible approver: the approver group {decision['approvers']} "
                                       f"minus requester/owners {sorted(excluded)} is empty")
        self.assigned_users = [{"id": a, "name": a} for a in approvers]
        self.subject = (f"Approve fine-tune of {decision['request']['model']} on dataset "
                        f"{decision['request']['dataset']} for {decision['request']['target_environment']}")
        self.body = self._summary(context, decision, approvers)
        common.record(context, "approval.requested", {
            "tier": decision["tier"], "approvers": approvers, "excluded": sorted(excluded),
            "policy_sha256": decision["policy_sha256"], "subject": self.subject,
        }, actor=common.requester(context))
        return super().execute(context)

    def _summary(self, context: Any, decision: dict[str, Any], approvers: list[str]) -> str:
        req = decision["request"]
        ti = context["ti"]
        template = settings.get("lineage_url_template", required=False)
        link = template.format(dag_id=ti.dag_id, run_id=ti.run_id) if template else "(not configured)"
        rows = [
            ("Model", f"{req['model']} {req.get('base_version') or ''}".strip()),
            ("Dataset", f"{req['dataset']} (table {decision['dataset_table']})"),
            ("Classification", decision["classification"]),
            ("Target environment", req["target_environment"]),
            ("Tuning method", req["tuning_method"]),
            ("Risk tier", f"{decision['tier']} - {'; '.join(decision['reasons'])}"),
            ("Policy", f"{decision['policy_name']} sha256 {decision['policy_sha256'][:16]}"),
            ("Requested by", req["requester"]),
            ("Eligible approvers", ", ".join(approvers)),
            ("Run", f"{ti.dag_id} / {ti.run_id}"),
            ("Lineage", link),
        ]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return ("A fine-tune can change what the model refuses and whether it can be jailbroken. "
                "Approve only if you expect this data to be safe for this model and environment.\n\n"
                "| | |\n|---|---|\n" + table)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        if "error" in event:
            common.record(context, "approval.expired", {"error_type": event.get("error_type"),
                                                        "error": str(event.get("error"))[:500]}, actor="airflow")
            raise AirflowFailException(f"approval not given ({event.get('error_type')}): the gate fails closed")
        result = super().execute_complete(context, event)
        responder = event.get("responded_by_user") or {}
        who = responder.get("id") or responder.get("name") or "unknown"
        option = (event.get("chosen_options") or [None])[0]
        ti = context["ti"]
        decision = policy_decision(common.lineage_store(), ti.dag_id, ti.run_id)
        allowed = set(decision["approvers"]) - self._excluded(context)
        if who not in allowed:
            common.record(context, "approval.violation", {
                "responder": who, "option": option, "allowed": sorted(allowed),
                "reason": "responder is the requester, an owner, or not an approver",
            }, actor=who)
            raise AirflowFailException(f"{who} may not answer this approval (separation of duties); "
                                       "the answer was recorded as a violation and does not count")
        if option == APPROVE:
            common.record(context, "approval.granted", {
                "approval_id": uuid.uuid4().hex, "responder": who, "option": option, "tier": decision["tier"],
                "policy_sha256": decision["policy_sha256"],
            }, actor=who)
            return result
        common.record(context, "approval.rejected", {"responder": who, "option": option}, actor=who)
        raise AirflowFailException(f"fine-tune rejected by {who}")

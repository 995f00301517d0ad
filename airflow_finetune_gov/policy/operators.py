"""PolicyCheckOperator: decide the change's risk tier and record the decision."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common
from airflow_finetune_gov.policy.engine import ChangeRequest, PolicyError


class PolicyCheckOperator(BaseOperator):
    """Evaluate the policy for this run's change request and record the decision in lineage.

    The decision (tier, approvers, quorum, dataset table, target environment) binds everything the
    run may do later: the lease and the promotion read it back from lineage, never from run conf.
    """

    template_fields = ("model", "dataset", "target_environment", "tuning_method", "base_version")
    ui_color = "#e8f0fe"

    def __init__(self, *, model: str, dataset: str, target_environment: str, tuning_method: str = "lora",
                 base_version: str = "", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.dataset = dataset
        self.target_environment = target_environment
        self.tuning_method = tuning_method
        self.base_version = base_version

    def execute(self, context: Any) -> dict[str, Any]:
        requester = common.requester(context)
        try:
            policy = common.policy()
            decision = policy.decide(ChangeRequest(
                model=self.model, dataset=self.dataset, target_environment=self.target_environment,
                requester=requester, tuning_method=self.tuning_method, base_version=self.base_version,
            ))
        except PolicyError as exc:
            common.record(context, "policy.error", {"error": str(exc)}, actor="policy")
            raise AirflowFailException(f"policy check failed: {exc}") from exc
        common.record(context, "policy.decided", decision.to_dict(), actor="policy")
        self.log.info("policy %s (sha256 %s): tier %s - %s", decision.policy_name, decision.policy_sha256[:12],
                      decision.tier, "; ".join(decision.reasons))
        if decision.tier == "deny":
            raise AirflowFailException(f"denied by policy: {'; '.join(decision.reasons)}")
        return {"tier": decision.tier, "reasons": decision.reasons, "policy_sha256": decision.policy_sha256}

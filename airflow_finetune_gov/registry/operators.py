"""PromoteModelOperator: move a model alias only for an approved run whose evaluation passed."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval
from airflow_finetune_gov.registry.store import ModelStore


class PromoteModelOperator(BaseOperator):
    """Point the alias named by the approved target environment at the tuned version.

    Everything is checked from lineage: the approval (who, tier), the evaluation verdict, the tuned
    version. The alias is the environment the policy decided on, so a run approved for ``test`` can
    never move ``production``.
    """

    template_fields = ("alias",)
    ui_color = "#e6f4ea"

    def __init__(self, *, alias: str | None = None, **kwargs: Any) -> None:
        """``alias``: optionally name the alias this task means to move; it must be the approved one."""
        super().__init__(**kwargs)
        self.alias = alias

    def _blocked(self, context: Any, reason: str) -> AirflowFailException:
        common.record(context, "promotion.blocked", {"reason": reason}, actor="promotion")
        return AirflowFailException(f"promotion blocked: {reason}")

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        try:
            approval = granted_approval(common.run_events(context), ti.run_id)
        except ApprovalMissing as exc:
            raise self._blocked(context, str(exc)) from exc
        evals = common.run_events(context, "evaluation.completed")
        tuned = common.run_events(context, "tuning.completed")
        if not tuned:
            raise self._blocked(context, "no tuning result recorded")
        t = tuned[-1].payload_dict()
        if not evals:
            raise self._blocked(context, "no evaluation recorded")
        e = evals[-1].payload_dict()
        if e["verdict"] != "pass" or e["version"] != t["version"]:
            raise self._blocked(context, f"evaluation verdict {e['verdict']} for version {e['version']}")
        store = ModelStore(settings.get("model_store"))
        problems = store.verify(t["model"], t["version"])
        if problems:
            raise self._blocked(context, f"model files do not match the manifest: {problems}")
        alias = approval["target_environment"]
        if self.alias and self.alias != alias:
            raise self._blocked(context, f"alias {self.alias!r} is not the approved target environment {alias!r}: "
                                         f"the run was approved (tier {approval['tier']}) for {alias} only")
        by = ",".join(approval["approvers"]) or "policy"
        move = store.set_alias(t["model"], alias, t["version"], by=by, run=f"{ti.dag_id}/{ti.run_id}")
        common.record(context, "promotion.completed", {
            "model": t["model"], "alias": alias, "version": t["version"], "previous": move["from"],
            "approval_id": approval["approval_id"], "approvers": approval["approvers"],
            "verdict": e["verdict"],
        }, actor="promotion")
        self.log.info("%s:%s -> %s (was %s)", t["model"], alias, t["version"], move["from"])
        return move

"""PolicyCheckOperator: decide the change's risk tier and record the decision."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common
from airflow_finetune_gov.approval.verify import seal_decision
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin
from airflow_finetune_gov.policy.engine import ChangeRequest, PolicyError


class PolicyCheckOperator(GovernedOpenLineageMixin, BaseOperator):
    """Evaluate the policy for this run's change request and record the decision in lineage.

    The decision (tier, approvers, quorum, dataset table, target environment) binds everything the
    run may do later: the lease and the promotion read it back from lineage, never from run conf.
    It also records what exactly is being approved: the dataset's row count and content hash (read
    through a short ``catalog`` lease that can compute digests but not read rows) and the tuning
    hyperparameters. The tuning step refuses data or hyperparameters that differ from these.
    """

    template_fields = ("model", "dataset", "target_environment", "tuning_method", "base_version",
                       "hyperparameters")
    ui_color = "#e8f0fe"

    def __init__(self, *, model: str, dataset: str, target_environment: str, tuning_method: str = "lora",
                 base_version: str = "", hyperparameters: dict[str, Any] | None = None,
                 dataset_digest: bool = True, vault_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hyperparameters = hyperparameters
        self.dataset_digest = dataset_digest
        self.vault_conn_id = vault_conn_id
        # A malformed policy file fails here, at DAG parse, naming the file, line and problem (the DAG
        # shows an import error instead of failing at run time).
        common.policy()
        self.model = model
        self.dataset = dataset
        self.target_environment = target_environment
        self.tuning_method = tuning_method
        self.base_version = base_version

    @staticmethod
    def _error(context: Any, error: str, **details: Any) -> AirflowFailException:
        """Record the check's failure as ``policy.error`` (so the run has no lineage gap) and fail."""
        common.record(context, "policy.error", {"error": error, **details}, actor="policy")
        return AirflowFailException(f"policy check failed: {error}")

    def execute(self, context: Any) -> dict[str, Any]:
        if common.remote():  # the decision is the control plane's: it runs this method there, as this task
            return common.control().execute("policy_check", {
                "model": self.model, "dataset": self.dataset, "target_environment": self.target_environment,
                "tuning_method": self.tuning_method, "base_version": self.base_version,
                "hyperparameters": self.hyperparameters, "dataset_digest": self.dataset_digest}, log=self.log)
        # Before anything is leased: a run whose start the scheduler did not witness cannot be governed.
        common.incarnation(context)
        requester = common.requester(context)
        try:
            policy = common.policy()
            decision = policy.decide(ChangeRequest(
                model=self.model, dataset=self.dataset, target_environment=self.target_environment,
                requester=requester, tuning_method=self.tuning_method, base_version=self.base_version,
            ))
            problems = policy.check_hyperparameters(self.hyperparameters)
            if problems:
                raise PolicyError(f"hyperparameters rejected: {'; '.join(problems)} (policy {policy.source})")
        except PolicyError as exc:
            raise self._error(context, str(exc)) from exc
        record = decision.to_dict()
        record["hyperparameters"] = dict(self.hyperparameters) if self.hyperparameters is not None else None
        record["dataset"] = None
        digest = self.dataset_digest
        if common.SERVING and not digest:  # a DAG argument cannot take the content hash out of the approval
            self.log.warning("dataset_digest=False is ignored with a control plane: every decision carries the "
                             "dataset's content hash, which the lease and the tuning step check")
            digest = True
        if decision.tier != "deny" and digest:
            record["dataset"] = self._digest(context, decision.dataset_table)
            if record["dataset"]["rows"] == 0:
                raise self._error(context, f"dataset {self.dataset!r} ({decision.dataset_table}) is empty: there is "
                                  "nothing to tune on", dataset=record["dataset"])
        record = seal_decision(record)
        common.record(context, "policy.decided", record, actor="policy")
        self.log.info("policy %s (sha256 %s): tier %s - %s; decision %s (sha256 %s)", decision.policy_name,
                      decision.policy_sha256[:12], decision.tier, "; ".join(decision.reasons), record["decision_id"],
                      record["decision_sha256"][:12])
        if decision.tier == "deny":
            raise AirflowFailException(f"denied by policy: {'; '.join(decision.reasons)}")
        return {"tier": decision.tier, "reasons": decision.reasons, "policy_sha256": decision.policy_sha256,
                "decision_id": record["decision_id"], "decision_sha256": record["decision_sha256"]}

    def _digest(self, context: Any, table: str) -> dict[str, Any]:
        import psycopg

        from airflow_finetune_gov import settings
        from airflow_finetune_gov.credentials.operators import service_credentials

        with service_credentials(context, "catalog", vault_conn_id=self.vault_conn_id) as creds, \
                common.datasets_connection(creds.username, creds.password) as conn:
            try:
                row = conn.execute("SELECT row_count, sha256 FROM catalog.dataset_digest(%s)", (table,)).fetchone()
            except (psycopg.errors.UndefinedTable, psycopg.errors.RaiseException):
                raise self._error(context, f"dataset table {table} does not exist in database "
                                  f"{settings.get('datasets_database')}; fix the policy's datasets entry or load "
                                  "the table") from None
        if row is None:
            raise AirflowFailException(f"no digest for dataset table {table}")
        uri = f"postgresql://{settings.get('datasets_host')}/{settings.get('datasets_database')}/{table}"
        self.log.info("dataset %s: %s rows, sha256 %s", uri, row[0], row[1])
        return {"uri": uri, "rows": int(row[0]), "sha256": str(row[1])}

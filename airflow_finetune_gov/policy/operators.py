"""PolicyCheckOperator: decide the change's risk tier and record the decision."""

from __future__ import annotations

from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common
from airflow_finetune_gov.approval import people
from airflow_finetune_gov.approval.verify import seal_decision
from airflow_finetune_gov.datasets.screening import ScreeningResult
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin
from airflow_finetune_gov.policy.engine import ChangeRequest, Policy, PolicyError

JUSTIFICATION_LIMIT = 1000  # characters of the requester's why kept in the request


class PolicyCheckOperator(GovernedOpenLineageMixin, BaseOperator):
    """Evaluate the policy for this run's change request and record the decision in lineage.

    The decision (tier, approvers, quorum, dataset table, target environment) binds everything the
    run may do later: the lease and the promotion read it back from lineage, never from run conf.
    It also records what exactly is being approved: the dataset's row count and content hash (read
    through a short ``catalog`` lease that can compute digests but not read rows) and the tuning
    hyperparameters. The tuning step refuses data or hyperparameters that differ from these.

    Then it screens exactly those rows (``dataset.screened``): read through the control plane's own ``screen``
    lease, each row's prompt is answered by the base model, and a row whose response complies where the base
    model refuses is flagged (ids and counts recorded, never text). The policy decides again with what the
    screening found (``flagged_rows``, ``flagged_share``, ``screening``), so flagged or unscreenable data can
    raise the tier or deny before anyone is asked.

    ``justification``: the requester's reason for the change (templated: the factory passes the run's
    ``justification`` param), kept in the request (one line, at most 1,000 characters) and shown to approvers
    as text.
    """

    template_fields = ("model", "dataset", "target_environment", "tuning_method", "base_version",
                       "hyperparameters", "justification")
    ui_color = "#e8f0fe"

    def __init__(self, *, model: str, dataset: str, target_environment: str, tuning_method: str = "lora",
                 base_version: str = "", hyperparameters: dict[str, Any] | None = None,
                 dataset_digest: bool = True, vault_conn_id: str | None = None, justification: str = "",
                 **kwargs: Any) -> None:
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
        self.justification = justification

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
                "hyperparameters": self.hyperparameters, "dataset_digest": self.dataset_digest,
                "justification": self.justification}, log=self.log)
        # Before anything is leased: a run whose start the scheduler did not witness cannot be governed.
        common.incarnation(context)
        requester = common.requester(context)
        try:
            policy = common.policy()
            request = ChangeRequest(
                model=self.model, dataset=self.dataset, target_environment=self.target_environment,
                requester=requester, tuning_method=self.tuning_method, base_version=self.base_version,
                justification=" ".join(str(self.justification or "").split())[:JUSTIFICATION_LIMIT],
                dag_id=context["ti"].dag_id,
            )
            members = people.members()  # the approvers' roles, read now (a request opens with their holders)
            decision = policy.decide(request, members=members)
            problems = policy.check_hyperparameters(self.hyperparameters)
            if problems:
                raise PolicyError(f"hyperparameters rejected: {'; '.join(problems)} (policy {policy.source})")
        except PolicyError as exc:
            raise self._error(context, str(exc)) from exc
        digest = self.dataset_digest
        if common.SERVING and not digest:  # a DAG argument cannot take the content hash out of the approval
            self.log.warning("dataset_digest=False is ignored with a control plane: every decision carries the "
                             "dataset's content hash, which the lease and the tuning step check")
            digest = True
        dataset: dict[str, Any] | None = None
        screening: ScreeningResult | None = None
        if decision.tier != "deny":
            if digest:
                dataset = self._digest(context, decision.dataset_table)
                if dataset["rows"] == 0:
                    raise self._error(context, f"dataset {self.dataset!r} ({decision.dataset_table}) is empty: there "
                                      "is nothing to tune on", dataset=dataset)
                screening = self._screen(context, policy, decision.dataset_table, dataset)
            else:
                screening = ScreeningResult(status="unavailable", reason="dataset_digest=False: without the "
                                            "content hash the rows screened could differ from the rows tuned on")
            common.record(context, "dataset.screened", {"dataset": self.dataset, "table": decision.dataset_table,
                                                        "sha256": dataset["sha256"] if dataset else None,
                                                        **screening.to_dict()}, actor="policy")
            self.log.info("%s", screening.summary())
            # the rules see what the screening found: flagged data can escalate the tier or deny, before anyone
            # is asked
            try:
                decision = policy.decide(request, screening.facts(), members=members)
            except PolicyError as exc:
                raise self._error(context, str(exc)) from exc
        record = decision.to_dict()
        record["hyperparameters"] = dict(self.hyperparameters) if self.hyperparameters is not None else None
        record["dataset"] = dataset
        record["screening"] = screening.to_dict() if screening is not None else None
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
        from airflow_finetune_gov.credentials.operators import service_connection

        with service_connection(context, "catalog", vault_conn_id=self.vault_conn_id) as conn:
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

    def _screen(self, context: Any, policy: Policy, table: str, dataset: dict[str, Any]) -> ScreeningResult:
        """Screen exactly the rows whose digest is being approved: read through a ``screen`` lease of its own (the
        control plane's; a task is refused it), answered by the base model, labelled by the policy's detector."""
        from airflow_finetune_gov import settings
        from airflow_finetune_gov.credentials.operators import service_connection
        from airflow_finetune_gov.datasets import screening
        from airflow_finetune_gov.evaluation.harness import PatternDetector
        from airflow_finetune_gov.registry.store import ModelStore, RegistryError
        from airflow_finetune_gov.tuning.backends import resolve_base, rows_sha256

        cfg = policy.screening
        if not cfg.enabled:
            return ScreeningResult(status="disabled", rows=dataset["rows"],
                                   reason=f"screening.enabled is false in policy {policy.source}")
        ref = f"{self.model}@{self.base_version}" if self.base_version else self.model
        store = ModelStore(settings.get("model_store"))
        try:
            manifest = resolve_base(store, ref)
        except (FileNotFoundError, RegistryError) as exc:
            return ScreeningResult(status="unavailable", rows=dataset["rows"],
                                   reason=f"base model {ref!r} is not in the model store, so nothing can answer the "
                                          f"rows' prompts as it would ({str(exc)[:300]})")
        with service_connection(context, "screen", vault_conn_id=self.vault_conn_id) as conn:
            rows = [(int(i), str(p), str(r)) for i, p, r in
                    conn.execute("SELECT id, prompt, response FROM catalog.dataset_rows(%s)", (table,)).fetchall()]
        if rows_sha256([(p, r) for _, p, r in rows]) != dataset["sha256"]:
            raise self._error(context, f"dataset table {table} changed while the policy check read it (its rows no "
                              f"longer hash to {dataset['sha256'][:12]}): run the policy check again once it is "
                              "stable", dataset=dataset)
        from airflow_finetune_gov.tuning.causal_lm import LocalModel

        base = {"name": manifest["name"], "version": manifest["version"], "sha256": manifest.get("sha256")}
        model = LocalModel(store.path(manifest["name"], manifest["version"]), max_new_tokens=cfg.max_new_tokens)
        return screening.screen(rows, model.generate, PatternDetector(), max_rows=cfg.max_rows, base=base)

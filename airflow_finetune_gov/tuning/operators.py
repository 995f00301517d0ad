"""GovernedFineTuneOperator: tune only with the run's leased credentials, and record what was done."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.log import mask_secret
from psycopg import sql

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval.verify import policy_decision
from airflow_finetune_gov.credentials import broker, lifecycle
from airflow_finetune_gov.credentials.hook import GovernedLeaseHook
from airflow_finetune_gov.registry.store import ModelStore
from airflow_finetune_gov.tuning.backends import DEMO_MODEL, ensure_demo_base, get_backend, rows_sha256
from airflow_finetune_gov.vault.bootstrap import tune_role_name


def read_dataset(creds: broker.Credentials, table: str) -> list[tuple[str, str]]:
    schema, name = table.split(".")
    with common.datasets_connection(creds.username, creds.password) as conn:
        cur = conn.execute(sql.SQL("SELECT prompt, response FROM {} ORDER BY id").format(
            sql.Identifier(schema, name)))
        return [(str(p), str(r)) for p, r in cur.fetchall()]


class GovernedFineTuneOperator(BaseOperator):
    """Fine-tune a model on the run's approved dataset, reading it only with the leased credentials.

    Refuses to start without a live lease recorded for this run. Records the dataset's content hash
    (of exactly the rows trained on), row count, base and output model versions and hashes,
    hyperparameters, backend and duration. ``on_kill`` revokes the run's leases.
    """

    template_fields = ("hyperparameters",)
    ui_color = "#f3e8fd"

    def __init__(self, *, lease_task_id: str = "acquire_lease", base_model: str = DEMO_MODEL,
                 backend: str = "responder", hyperparameters: dict[str, Any] | None = None,
                 vault_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lease_task_id = lease_task_id
        self.base_model = base_model
        self.backend = backend
        self.hyperparameters = hyperparameters or {"epochs": 3, "learning_rate": 0.2}
        self.vault_conn_id = vault_conn_id
        self._context: Any = None
        self._keeper: broker.LeaseKeeper | None = None

    def execute(self, context: Any) -> dict[str, Any]:
        self._context = context
        ti = context["ti"]
        approved_hp = policy_decision(common.lineage_store(), ti.dag_id, ti.run_id).get("hyperparameters")
        if approved_hp is not None and approved_hp != dict(self.hyperparameters):
            common.record(context, "tuning.refused", {"reason": "hyperparameters differ from what was approved",
                                                      "approved": approved_hp, "asked": dict(self.hyperparameters)},
                          actor="tuning")
            raise AirflowFailException(f"hyperparameters {dict(self.hyperparameters)} are not the approved "
                                       f"{approved_hp}")
        states = lifecycle.lease_states(common.lineage_store().events(dag_id=ti.dag_id, run_id=ti.run_id,
                                                                       event_prefix="lease."))
        live = [s for s in states.values() if s.status == "live" and s.purpose == "training"]
        if not live:
            raise AirflowFailException("no live credential lease is recorded for this run: tuning needs the "
                                       f"lease from task {self.lease_task_id!r}")
        lease = live[-1]
        issued = next(e.payload_dict() for e in common.run_events(context, "lease.issued")
                      if e.payload_dict()["lease_id"] == lease.lease_id)
        ident = common.identity(context)
        hook = GovernedLeaseHook(self.vault_conn_id)

        def tune_client() -> Any:
            return hook.client(ident, role=tune_role_name(lease.dataset), purpose="tune",
                               extra={"dataset": lease.dataset})

        try:
            wrap_token = broker.take_handover(tune_client(), settings.get("handover_mount"), lease.dataset,
                                              ident.run_key, lease.lease_id)
            mask_secret(wrap_token)
            creds = broker.unwrap(common.vault_addr(hook.vault_conn_id), wrap_token,
                                  expected_digest=issued["wrap_token_sha256"])
        except broker.LeaseError as exc:
            common.record(context, "lease.handover_failed", {"lease_id": lease.lease_id, "error": str(exc)[:500]},
                          actor="tuning")
            raise AirflowFailException(str(exc)) from None
        mask_secret(creds.password)
        if creds.username != lease.db_role:
            raise AirflowFailException("the handed-over credentials are not the leased role's")

        def renew_once() -> int:
            return broker.renew(tune_client(), lease.lease_id, int(issued["requested_ttl"]))

        def renewed(ttl: int) -> None:
            common.record(context, "lease.renewed", {
                "lease_id": lease.lease_id, "ttl_seconds": ttl,
                "expires_at": (datetime.now(UTC) + timedelta(seconds=ttl)).isoformat()}, actor="tuning")

        def renew_failed(exc: BaseException) -> None:
            self.log.warning("renewing lease %s failed (retrying): %s", lease.lease_id, exc)

        self._keeper = broker.LeaseKeeper(renew_once, int(issued["lease_duration"]), on_renewed=renewed,
                                          on_error=renew_failed).start()
        try:
            return self._tune(context, lease, issued, creds)
        finally:
            self._keeper.stop()

    def _tune(self, context: Any, lease: lifecycle.LeaseState, issued: dict[str, Any],
              creds: broker.Credentials) -> dict[str, Any]:
        started = time.monotonic()
        rows = read_dataset(creds, issued["dataset_table"])
        del creds
        if not rows:
            raise AirflowFailException(f"dataset {lease.dataset} is empty")
        data_sha = rows_sha256(rows)
        approved = issued.get("approved_sha256")
        if approved and approved != data_sha:
            common.record(context, "tuning.refused", {
                "reason": "dataset content differs from what was approved", "approved_sha256": approved,
                "content_sha256": data_sha, "rows": len(rows), "dataset": lease.dataset}, actor="tuning")
            raise AirflowFailException(f"dataset {lease.dataset} changed since approval: it hashes to {data_sha[:16]}, "
                                       f"the approved content to {approved[:16]}; trigger a new run for a new "
                                       "approval")
        self.log.info("read %d rows of %s with leased role %s (sha256 %s)", len(rows), lease.dataset,
                      lease.db_role, data_sha[:16])

        store = ModelStore(settings.get("model_store"))
        if self.base_model != DEMO_MODEL:
            raise AirflowFailException(f"base model {self.base_model!r} is not available to backend {self.backend}")
        base = ensure_demo_base(store)
        base_files = {f: store.read(base["name"], base["version"], f) for f in base["files"]}
        backend = get_backend(self.backend)
        trained = backend.train(base_files, rows, dict(self.hyperparameters), self.log.info)
        out = store.put(base["name"], trained.files, {
            "kind": "fine-tune", "base_version": base["version"], "dataset": lease.dataset,
            "dataset_sha256": data_sha, "run": f"{context['ti'].dag_id}/{context['ti'].run_id}",
        })
        duration = round(time.monotonic() - started, 3)
        payload = {
            "backend": backend.name, "dataset": lease.dataset, "dataset_uri":
            f"postgresql://{settings.get('datasets_host')}/{settings.get('datasets_database')}/{issued['dataset_table']}",
            "content_sha256": data_sha, "rows": len(rows), "lease_id": lease.lease_id,
            "db_role": lease.db_role, "base_model": base["name"], "base_version": base["version"],
            "base_sha256": base["sha256"], "model": out["name"], "version": out["version"],
            "output_sha256": out["sha256"], "hyperparameters": dict(self.hyperparameters),
            "metrics": trained.metrics, "duration_seconds": duration,
        }
        common.record(context, "tuning.completed", payload, actor="tuning")
        self.log.info("tuned %s -> version %s in %.2fs", base["name"], out["version"], duration)
        return {"model": out["name"], "version": out["version"], "sha256": out["sha256"]}

    def on_kill(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()  # a renewal must not race the revocation below
        if self._context is None:
            return
        from airflow_finetune_gov.credentials.operators import revoke_run_leases

        try:
            revoke_run_leases(self._context, reason="tuning task killed")
        except Exception:
            self.log.exception("revoking the run's leases on kill failed; the teardown task and "
                               "`fgov leases sweep` will retry")

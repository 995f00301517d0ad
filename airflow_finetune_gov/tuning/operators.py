"""GovernedFineTuneOperator: tune only with the run's leased credentials, and record what was done."""

from __future__ import annotations

import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException
from airflow.sdk.log import mask_secret
from psycopg import sql

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval
from airflow_finetune_gov.control.client import ControlPlaneError
from airflow_finetune_gov.credentials import broker, lifecycle
from airflow_finetune_gov.credentials.hook import GovernedLeaseHook
from airflow_finetune_gov.credentials.identity import TaskIdentity
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin
from airflow_finetune_gov.registry.store import ModelStore, RegistryError
from airflow_finetune_gov.tuning.backends import (
    BACKENDS,
    DEMO_MODEL,
    RUNNING,
    SUCCEEDED,
    TuningBackend,
    TuningError,
    TuningJob,
    TuningRequest,
    TuningResult,
    get_backend,
    resolve_base,
    rows_sha256,
)
from airflow_finetune_gov.vault.bootstrap import tune_role_name


def read_dataset(creds: broker.Credentials, table: str) -> list[tuple[str, str]]:
    schema, name = table.split(".")
    with common.datasets_connection(creds.username, creds.password) as conn:
        cur = conn.execute(sql.SQL("SELECT prompt, response FROM {} ORDER BY id").format(
            sql.Identifier(schema, name)))
        return [(str(p), str(r)) for p, r in cur.fetchall()]


def mask_backend_secret(values: dict[str, str]) -> None:
    """Mask a backend secret's values in every log (but its base URL: not secret, and useful to read)."""
    for key, value in values.items():
        if not key.upper().endswith("_URL"):
            mask_secret(value)


def settle_remote_jobs(context: Any, *, vault_conn_id: str | None = None) -> list[dict[str, Any]]:
    """Cancel this run's remote tuning jobs that no task saw end, and record ``tuning.cancelled``.

    The teardown calls it: a deferred task killed before the triggerer picked its trigger up gets no
    ``on_kill``, and a trigger that lost track of its job (``status: error``) leaves it running. Logs
    in as the run's tuning identity for the job's dataset to read the API key.
    """
    from airflow_finetune_gov.tuning.openai_compatible import STATUSES, FineTuningClient

    events = [(e.event_type, e.payload_dict()) for e in common.run_events(context, every_incarnation=True)
              if e.event_type in ("tuning.submitted", "tuning.completed", "tuning.failed", "tuning.cancelled")]
    # ended: completed, cancelled, or failed on the remote side (not: the trigger lost track of it)
    ended = {p.get("remote_job_id") for kind, p in events
             if kind != "tuning.submitted" and (kind != "tuning.failed" or p.get("status") in STATUSES)}
    open_jobs = [p for kind, p in events if kind == "tuning.submitted" and p["remote_job_id"] not in ended]
    hook = GovernedLeaseHook(vault_conn_id)
    settled = []
    for sub in open_jobs:
        client = hook.client(common.identity(context), role=tune_role_name(sub["dataset"]), purpose="tune",
                             extra={"dataset": sub["dataset"]})
        secret = broker.read_backend_secret(client, settings.get("backends_mount"), sub["kv_path"])
        mask_backend_secret(secret)
        api = FineTuningClient.from_secret(secret, sub["api_base"])
        before = str(api.job(sub["remote_job_id"]).get("status"))
        after = before if before in STATUSES else str(api.cancel(sub["remote_job_id"]).get("status"))
        outcome = {"backend": sub["backend"], "remote_job_id": sub["remote_job_id"], "status_before": before,
                   "status": after, "by": "teardown"}
        common.record(context, "tuning.cancelled", outcome, actor="tuning")
        settled.append(outcome)
    return settled


def _resolve_base(store: ModelStore, ref: str) -> dict[str, Any]:
    """The base model's manifest; through the control plane when there is one (it builds the demo base)."""
    if common.remote():
        try:
            return dict(common.control().call("/v1/models/base", {"ref": ref}))
        except ControlPlaneError as exc:
            raise RegistryError(str(exc)) from None
    return resolve_base(store, ref)


def store_result(context: Any, store: ModelStore, pending: dict[str, Any], result: TuningResult) -> dict[str, Any]:
    """Put the tuned files in the model store and record ``model.stored``. With a control plane the task cannot
    write the store: it writes its files to a staging directory the control plane made for this task try, and
    the control plane copies them in (taking the task's own regular files only) and records the version."""
    ti = context["ti"]
    files = result.files or {}
    metadata = {"kind": result.kind, "backend": pending["backend"], "dataset": pending["dataset"],
                "dataset_sha256": pending["content_sha256"], "hyperparameters": pending["hyperparameters"]}
    if common.remote():
        plane = common.control()
        folder = Path(plane.call("/v1/models/staging", {})["path"])
        for fname, data in files.items():
            if "/" in fname or fname.startswith("."):
                raise TuningError(f"the backend returned a file named {fname!r}: plain file names only")
            (folder / fname).write_bytes(data)
        return dict(plane.call("/v1/models/store", {
            "name": pending["model"], "files": sorted(files), "base_model": pending["base_model"],
            "base_version": pending["base_version"], "metadata": metadata}))
    out = store.put(pending["model"], files, {
        **metadata, "base_model": pending["base_model"], "base_version": pending["base_version"],
        "run": f"{ti.dag_id}/{ti.run_id}"})
    size = sum(len(data) for data in files.values())
    common.record(context, "model.stored", {
        "model": out["name"], "version": out["version"], "sha256": out["sha256"], "files": len(out["files"]),
        "bytes": size, "base_model": pending["base_model"], "base_version": pending["base_version"]},
        actor="tuning")
    return out


def remote_version(identity: TaskIdentity, submitted: list[dict[str, Any]], name: str, job_id: str, base_model: str,
                   metadata: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Put a remote job's model in the store as a version holding ``remote.json`` (the provider's model id, its
    base, the endpoint and the OpenBao path of its key, never the key), from what the provider says of the job
    (asked with the ``endpoints`` identity). ``submitted``: the run's ``tuning.submitted`` payloads, which name
    the job's secret. Returns the manifest and the ``model.stored`` payload."""
    from airflow_finetune_gov.credentials.operators import endpoint_secret
    from airflow_finetune_gov.tuning.openai_compatible import REMOTE_FILE, FineTuningClient, remote_pointer

    kv_path = next((p.get("kv_path") for p in submitted if p.get("remote_job_id") == job_id), None)
    if not kv_path:
        raise TuningError(f"remote job {job_id} was not recorded as submitted by this task (tuning.submitted): "
                          "only a job this run started is stored")
    client = FineTuningClient.from_secret(endpoint_secret(identity, str(kv_path)))
    pointer = remote_pointer(client, job_id, base_model, str(kv_path))
    data = json.dumps(pointer, indent=2, sort_keys=True).encode() + b"\n"
    store = ModelStore(settings.get("model_store"))
    manifest = store.put(name, {REMOTE_FILE: data}, {
        **metadata, "kind": "remote", "base_model": base_model, "base_version": None,
        "remote_model": pointer["remote_model"], "endpoint": pointer["endpoint"],
        "run": f"{identity.dag_id}/{identity.run_id}"})
    payload = {"model": name, "version": manifest["version"], "sha256": manifest["sha256"], "files": 1,
               "bytes": len(data), "base_model": base_model, "base_version": None, "kind": "remote",
               "remote_model": pointer["remote_model"], "endpoint": pointer["endpoint"], "kv_path": kv_path,
               "remote_job_id": job_id}
    return manifest, payload


def store_remote_result(context: Any, pending: dict[str, Any], job_id: str) -> dict[str, Any]:
    """A remote job's model as a store version, recorded as ``model.stored``: by the control plane, with one."""
    metadata = {"backend": pending["backend"], "dataset": pending["dataset"],
                "dataset_sha256": pending["content_sha256"], "hyperparameters": pending["hyperparameters"]}
    if common.remote():
        return dict(common.control().call("/v1/models/remote", {
            "name": pending["model"], "remote_job_id": job_id, "base_model": pending["base_model"],
            "metadata": metadata}))
    submitted = [e.payload_dict() for e in common.run_events(context, "tuning.submitted")]
    manifest, payload = remote_version(common.identity(context), submitted, pending["model"], job_id,
                                       pending["base_model"], metadata)
    common.record(context, "model.stored", payload, actor="tuning")
    return manifest


class GovernedFineTuneOperator(GovernedOpenLineageMixin, BaseOperator):
    """Fine-tune a model on the run's approved dataset, reading it only with the leased credentials.

    Refuses to start without a live lease recorded for this run, with hyperparameters other than
    the approved ones or out of the backend's range, or with a base model that is not there. Reads
    the rows with the leased role and refuses content whose hash differs from the approved one.
    Runs the backend's job, logging its progress, and records the dataset URI and content hash (of
    exactly the rows trained on), row count, base model and its hash, hyperparameters, backend,
    output model version and hash, metrics and duration. ``on_kill`` cancels the job (no trainer
    outlives the task) and revokes the run's leases.

    :param backend: ``local_peft`` (default), ``command``, or a name given to ``register_backend``.
    :param base_model: ``name`` (the store's ``base`` alias), ``name@version`` or ``name:alias``;
        the demo model ``fgov-demo-tiny`` is built on first use.
    :param command: the trainer's argv for ``backend="command"`` (credentials go in its environment).
    :param output_model: model-store name of the result (default: the base model's name).
    :param backend_kv_path: path of the backend's secret in OpenBao's backends mount (``[finetune_gov]
        backends_mount``), read with the run's tuning identity; its fields go into the backend's
        environment (``OPENAI_API_KEY``, ``HF_TOKEN``, ...) and are masked. Default: the backend's own
        (``openai`` for ``openai_compatible``), none for the others.
    :param deferrable: follow a remote job (``openai_compatible``) from the triggerer, holding no worker
        slot while it runs (default); ``False`` polls in the worker.
    :param poll_interval: seconds between polls of the job (default 0.5 local, 30 remote).
    """

    template_fields = ("hyperparameters", "base_model", "command", "output_model", "backend_kv_path")
    ui_color = "#f3e8fd"

    def __init__(self, *, lease_task_id: str = "acquire_lease", base_model: str = DEMO_MODEL,
                 backend: str = "local_peft", hyperparameters: dict[str, Any] | None = None,
                 command: list[str] | None = None, output_model: str | None = None,
                 backend_kv_path: str | None = None, deferrable: bool = True, poll_interval: float | None = None,
                 vault_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if backend not in BACKENDS:
            raise ValueError(f"unknown tuning backend {backend!r}; available: {', '.join(sorted(BACKENDS))} "
                             "(register your own with airflow_finetune_gov.tuning.backends.register_backend)")
        self.lease_task_id = lease_task_id
        self.base_model = base_model
        self.backend = backend
        self.hyperparameters = hyperparameters if hyperparameters is not None else {}
        self.command = command
        self.output_model = output_model
        self.backend_kv_path = backend_kv_path
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.vault_conn_id = vault_conn_id
        self._context: Any = None
        self._keeper: broker.LeaseKeeper | None = None
        self._job: TuningJob | None = None
        self._failure_recorded = False  # on_kill recorded tuning.failed: the interrupted execute does not again
        self._kv_path: str | None = None

    def _refuse(self, context: Any, reason: str, **details: Any) -> AirflowFailException:
        common.record(context, "tuning.refused", {"reason": reason, **details}, actor="tuning")
        return AirflowFailException(reason)

    def execute(self, context: Any) -> dict[str, Any]:
        self._context = context
        ti = context["ti"]
        hp = dict(self.hyperparameters)
        try:
            # here for a clear early error only: who approves now (roles) is the control plane's to read, and it
            # checks again, with them, before it lets the task log in for a credential
            approval = granted_approval(common.run_events(context), ti.run_id)
        except ApprovalMissing as exc:
            raise self._refuse(context, f"no approval of the run's current policy decision: {exc}") from None
        approved_hp = approval.get("hyperparameters")
        if approved_hp is not None and approved_hp != hp:
            raise self._refuse(context, f"hyperparameters {hp} are not the approved {approved_hp}",
                               approved=approved_hp, asked=hp)
        backend = get_backend(self.backend)
        try:
            backend.validate(hp)
        except ValueError as exc:
            raise self._refuse(context, f"hyperparameters rejected by backend {self.backend}: {exc}", asked=hp) \
                from None
        store = ModelStore(settings.get("model_store"))
        try:
            base: dict[str, Any] | None = _resolve_base(store, self.base_model)
        except (FileNotFoundError, RegistryError) as exc:
            if backend.needs_local_base:
                raise self._refuse(context, str(exc), base_model=self.base_model) from None
            base = None  # a remote or trainer-side base model: recorded by name
        states = lifecycle.lease_states(common.run_events(context, event_prefix="lease."))
        live = [s for s in states.values() if s.status == "live" and s.purpose == "training"]
        if not live:
            raise AirflowFailException("no live credential lease is recorded for this run: tuning needs the "
                                       f"lease from task {self.lease_task_id!r}")
        lease = live[-1]
        issued = next(e.payload_dict() for e in common.run_events(context, "lease.issued")
                      if e.payload_dict()["lease_id"] == lease.lease_id)
        if issued.get("decision_sha256") != approval["decision_sha256"]:
            raise self._refuse(context, f"lease {lease.lease_id} was issued under another policy decision than the "
                               f"approved one ({approval['decision_id']}): the decision changed after the lease",
                               lease_id=lease.lease_id)
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
        self._kv_path = self.backend_kv_path or getattr(backend, "kv_path", None)
        backend_env: dict[str, str] = {}
        if self._kv_path:
            try:
                backend_env = broker.read_backend_secret(tune_client(), settings.get("backends_mount"), self._kv_path)
            except broker.LeaseError as exc:
                raise self._refuse(context, str(exc), kv_path=self._kv_path) from None
            mask_backend_secret(backend_env)

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
            return self._tune(context, backend, store, base, lease, issued, creds, backend_env)
        finally:
            self._keeper.stop()

    def _tune(self, context: Any, backend: TuningBackend, store: ModelStore, base: dict[str, Any] | None,
              lease: lifecycle.LeaseState, issued: dict[str, Any], creds: broker.Credentials,
              backend_env: dict[str, str]) -> dict[str, Any]:
        started = time.time()
        rows = read_dataset(creds, issued["dataset_table"])
        if not rows:
            raise self._refuse(context, f"dataset {lease.dataset} is empty: there is nothing to tune on",
                               dataset=lease.dataset)
        data_sha = rows_sha256(rows)
        approved = issued.get("approved_sha256")
        if approved and approved != data_sha:
            raise self._refuse(
                context, f"dataset {lease.dataset} changed since approval: it hashes to {data_sha[:16]}, the "
                f"approved content to {approved[:16]}; trigger a new run for a new approval",
                approved_sha256=approved, content_sha256=data_sha, rows=len(rows), dataset=lease.dataset)
        self.log.info("read %d rows of %s with leased role %s (sha256 %s)", len(rows), lease.dataset,
                      lease.db_role, data_sha[:16])
        host, _, port = settings.get("datasets_host").partition(":")
        env = {"PGHOST": host, "PGPORT": port or "5432", "PGDATABASE": settings.get("datasets_database"),
               "PGUSER": creds.username, "PGPASSWORD": creds.password,
               "FGOV_DATASET_TABLE": issued["dataset_table"], **backend_env}
        del creds, backend_env
        hp = dict(self.hyperparameters)
        if self.command is not None:
            hp["command"] = list(self.command)
        base_name = base["name"] if base else self.base_model
        base_version = base["version"] if base else None
        uri = (f"postgresql://{settings.get('datasets_host')}/{settings.get('datasets_database')}/"
               f"{issued['dataset_table']}")
        common.record(context, "tuning.started", {
            "backend": backend.name, "dataset": lease.dataset, "dataset_uri": uri, "content_sha256": data_sha,
            "rows": len(rows), "base_model": self.base_model, "base_version": base_version,
            "hyperparameters": dict(self.hyperparameters),
        }, actor="tuning")
        name = self.output_model or (base_name if base else self.base_model.split("@")[0].split(":")[0])
        # what tuning.completed will say besides the result; travels to execute_complete when deferred
        pending: dict[str, Any] = {
            "backend": backend.name, "dataset": lease.dataset, "dataset_uri": uri,
            "content_sha256": data_sha, "rows": len(rows), "lease_id": lease.lease_id,
            "db_role": lease.db_role, "base_model": base_name, "base_version": base_version,
            "base_sha256": base["sha256"] if base else None, "model": name,
            "hyperparameters": dict(self.hyperparameters), "started_at": started,
        }
        with tempfile.TemporaryDirectory(prefix="fgov-tune-") as work:
            request = TuningRequest(
                base_model=self.base_model, base_dir=store.path(base_name, base_version) if base_version else None,
                rows=rows, hyperparameters=hp, work_dir=Path(work), env=env, log=self.log.info)
            remote: dict[str, Any] = {}  # the remote job's id and last status, for lineage
            try:
                self._job = backend.start(request)
                env.clear()
                deferral = getattr(self._job, "deferral", None)
                if deferral is not None:
                    job = deferral()
                    remote["remote_job_id"] = job["job_id"]
                    self._submitted(context, lease, pending, job)
                    if self.deferrable:
                        self._defer(context, lease, pending, job)
                interval = self.poll_interval if self.poll_interval is not None else \
                    (0.5 if deferral is None else 30.0)
                status = self._job.poll()
                while status == RUNNING:
                    self._job.wait(interval)
                    status = self._job.poll()
                if remote:
                    remote["status"] = status
                if status != SUCCEEDED:
                    self._job.result()  # raises with the job's own error
                    raise TuningError(f"tuning job ended {status}")
                result = self._job.result()
            except (TuningError, ValueError, OSError) as exc:
                raise self._failed(context, backend.name, str(exc), **remote) from exc
            finally:
                env.clear()
        return self._complete(context, pending, result, store, **remote)

    def _failed(self, context: Any, backend: str, error: str, **details: Any) -> AirflowFailException:
        if not self._failure_recorded:
            common.record(context, "tuning.failed", {"backend": backend, "error": error[:1000], **details},
                          actor="tuning")
            self._failure_recorded = True
        return AirflowFailException(f"tuning failed ({backend}): {error}")

    def _submitted(self, context: Any, lease: lifecycle.LeaseState, pending: dict[str, Any],
                   job: dict[str, Any]) -> None:
        """Record a remote job as soon as it exists: the teardown cancels it if no task sees it end."""
        common.record(context, "tuning.submitted", {
            "backend": pending["backend"], "remote_job_id": job["job_id"], "api_base": job["base_url"],
            "kv_path": self._kv_path, "dataset": lease.dataset, "content_sha256": pending["content_sha256"],
            "deferred": self.deferrable,
        }, actor="tuning")

    @staticmethod
    def _delegation() -> str | None:
        """With a control plane: the delegation the trigger acts with (masked in this task's log)."""
        if not common.remote():
            return None
        delegation = common.control().delegate()
        mask_secret(delegation)
        return delegation

    def _defer(self, context: Any, lease: lifecycle.LeaseState, pending: dict[str, Any],
               job: dict[str, Any]) -> None:
        """Hand the remote job to the triggerer: no worker slot is held while it runs."""
        from airflow_finetune_gov.tuning.triggers import RemoteFineTuningTrigger

        ident = common.identity(context)
        trigger = RemoteFineTuningTrigger(
            job_id=job["job_id"], base_url=job["base_url"],
            vault_addr=common.vault_addr(GovernedLeaseHook(self.vault_conn_id).vault_conn_id),
            identity={"dag_id": ident.dag_id, "run_id": ident.run_id, "task_id": ident.task_id,
                      "try_number": ident.try_number},
            dataset=lease.dataset, secret_path=str(self._kv_path),
            secret_mount=settings.get("backends_mount"), jwt_mount=settings.get("jwt_auth_mount"),
            poll_interval=self.poll_interval if self.poll_interval is not None else 30.0,
            delegation=self._delegation())
        self.log.info("deferring: the triggerer follows remote job %s; no worker slot is held meanwhile",
                      job["job_id"])
        self.defer(trigger=trigger, method_name="execute_complete", kwargs={"pending": pending})

    def execute_complete(self, context: Any, event: dict[str, Any], pending: dict[str, Any]) -> dict[str, Any]:
        """Resume after the trigger fired: record the remote job's outcome."""
        self._context = context
        if event.get("status") != "succeeded" or not event.get("fine_tuned_model"):
            error = event.get("error") or f"the remote job ended {event.get('status')} without a model"
            raise self._failed(context, pending["backend"], f"remote job {event.get('job_id')}: {error}",
                               remote_job_id=event.get("job_id"), status=event.get("status"))
        result = TuningResult(remote_model=str(event["fine_tuned_model"]), metrics=dict(event.get("metrics") or {}),
                              kind="remote")
        return self._complete(context, pending, result, None, remote_job_id=event.get("job_id"))

    def _complete(self, context: Any, pending: dict[str, Any], result: TuningResult, store: ModelStore | None,
                  **details: Any) -> dict[str, Any]:
        self._job = None  # it ended with a result: a kill from here on is not the job's failure
        payload = {k: v for k, v in pending.items() if k != "started_at"}
        out: dict[str, Any] = {"name": pending["model"], "version": None, "sha256": None}
        try:
            if result.files:
                assert store is not None
                out = store_result(context, store, pending, result)
            elif result.kind == "remote" and details.get("remote_job_id"):
                out = store_remote_result(context, pending, str(details["remote_job_id"]))
        except (TuningError, RegistryError, ControlPlaneError, AirflowFailException) as exc:
            what = "remote model" if result.kind == "remote" else "tuned model"
            raise self._failed(context, pending["backend"], f"the {what} was not stored: {exc}", **details) from exc
        duration = round(time.time() - float(pending["started_at"]), 3)
        payload.update({"model": out["name"], "version": out["version"], "output_sha256": out["sha256"],
                        "remote_model": result.remote_model, "kind": result.kind, "metrics": result.metrics,
                        "duration_seconds": duration, **details})
        common.record(context, "tuning.completed", payload, actor="tuning")
        self.log.info("tuned %s -> %s %s in %.2fs (%s)", payload["base_model"], out["name"],
                      out["version"] or result.remote_model, duration, result.metrics)
        return {"model": out["name"], "version": out["version"], "sha256": out["sha256"],
                "remote_model": result.remote_model}

    def on_kill(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()  # a renewal must not race the revocation below
        if self._job is not None:
            try:
                self._job.cancel()  # no trainer outlives its task
            except Exception:
                self.log.exception("cancelling the tuning job failed")
        if self._context is None:
            return
        if self._job is not None:
            # recorded here, not only by the interrupted execute: the process may be killed before it resumes.
            # First, before the revocation: it is one record, and the kill's grace may end during a revocation
            # (the teardown and the sweep revoke what this one does not)
            try:
                self._failed(self._context, self.backend, "cancelled: the tuning task was killed")
            except Exception:
                self.log.exception("recording tuning.failed on kill failed")
        from airflow_finetune_gov.credentials.operators import revoke_run_leases

        try:
            revoke_run_leases(self._context, reason="tuning task killed")
        except Exception:
            self.log.exception("revoking the run's leases on kill failed; the teardown task and "
                               "`fgov leases sweep` will retry")

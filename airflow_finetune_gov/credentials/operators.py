"""AcquireLeaseOperator (setup), RevokeLeaseOperator (teardown) and LeaseSweepOperator (the net)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.sdk.log import mask_secret

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval
from airflow_finetune_gov.credentials import broker, lifecycle
from airflow_finetune_gov.credentials.hook import GovernedLeaseHook
from airflow_finetune_gov.credentials.identity import TaskIdentity
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin
from airflow_finetune_gov.lineage.store import LineageError
from airflow_finetune_gov.vault.bootstrap import REVOKER_ROLE, db_role_name, lease_role_name

LOGIN_ATTEMPTS = 3


def _seconds(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    return float(value)


class AcquireLeaseOperator(GovernedOpenLineageMixin, BaseOperator):
    """Issue dataset-scoped dynamic database credentials for an approved run (use as a setup task).

    Checks the approval in lineage first (never the gate task's state or XCom), then logs in with a
    JWT naming this task try, the approved dataset and the approval id. The lease TTL is derived from
    ``expected_duration`` (seconds or a timedelta; templated) with a margin, within the policy's
    bounds. The credentials are response-wrapped and parked for this run's tuning task; XCom and
    lineage get only the lease id, role name, token accessor, TTL and timestamps.
    """

    template_fields = ("expected_duration",)
    ui_color = "#e6f4ea"

    def __init__(self, *, expected_duration: timedelta | float | str | None = None,
                 vault_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.expected_duration = expected_duration
        self.vault_conn_id = vault_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        try:
            # here for a clear early error only: who approves now (roles) is the control plane's to read, and it
            # checks again, with them, before it lets the task log in for a credential
            approval = granted_approval(common.run_events(context), ti.run_id)
        except ApprovalMissing as exc:
            common.record(context, "lease.refused", {"reason": str(exc)}, actor="lease-broker")
            raise AirflowFailException(f"no lease without a recorded approval: {exc}") from exc
        if approval["change"] != "finetune":
            common.record(context, "lease.refused", {"reason": f"the approval is for a {approval['change']}"},
                          actor="lease-broker")
            raise AirflowFailException(f"no lease for a {approval['change']} approval: only an approved "
                                       "fine-tune leases training data")
        dataset = approval["dataset"]
        bounds = common.policy().lease
        limit = int(bounds["max_leases_per_approval"])
        earlier = [p for e in common.run_events(context, "lease.issued")
                   if (p := e.payload_dict()).get("purpose") == "training"
                   and p.get("decision_sha256") == approval["decision_sha256"]]
        if len(earlier) >= limit:
            reason = (f"the approval of decision {approval['decision_id']} has issued {len(earlier)} training lease(s) "
                      f"already, the policy's max_leases_per_approval is {limit}")
            common.record(context, "lease.refused", {
                "reason": reason, "dataset": dataset, "approval_id": approval["approval_id"],
                "decision_sha256": approval["decision_sha256"], "leases_issued": len(earlier), "limit": limit,
                "earlier_leases": [p.get("lease_id") for p in earlier]}, actor="lease-broker")
            raise AirflowFailException(f"no lease: {reason}. Clearing the run again does not issue more credentials "
                                       "under one approval; trigger a new run to ask for a new approval")
        try:
            ttl = broker.derive_ttl(_seconds(self.expected_duration),
                                    default_seconds=int(bounds["default_ttl_minutes"]) * 60,
                                    min_seconds=int(bounds["min_ttl_minutes"]) * 60,
                                    max_seconds=int(bounds["max_ttl_minutes"]) * 60)
        except (broker.LeaseError, ValueError) as exc:
            common.record(context, "lease.refused", {"reason": f"bad expected_duration: {exc}"}, actor="lease-broker")
            raise AirflowFailException(f"expected_duration {self.expected_duration!r} is not usable: {exc}") from exc
        common.record(context, "lease.requested", {
            "purpose": "training", "dataset": dataset, "approval_id": approval["approval_id"],
            "decision_sha256": approval["decision_sha256"], "lease_number": len(earlier) + 1,
            "max_leases_per_approval": limit, "ttl_seconds": ttl,
            "expected_duration_seconds": _seconds(self.expected_duration), "vault_role": lease_role_name(dataset),
        }, actor="lease-broker")
        self.log.info("approval %s verified (tier %s, approvers %s); leasing dataset %s for %ss",
                      approval["approval_id"], approval["tier"], approval["approvers"] or ["policy"], dataset, ttl)
        ident = common.identity(context)
        try:
            client = GovernedLeaseHook(self.vault_conn_id).client(
                ident, role=lease_role_name(dataset), purpose="lease",
                extra={"dataset": dataset, "approval_id": approval["approval_id"]})
            lease_broker = broker.LeaseBroker(client, settings.get("database_mount"), settings.get("handover_mount"))
            issued = lease_broker.issue(db_role_name(dataset), ttl_seconds=ttl, wrap_ttl_seconds=ttl)
        except broker.LeaseError as exc:
            common.record(context, "lease.refused", {"reason": str(exc)[:500], "dataset": dataset},
                          actor="lease-broker")
            raise AirflowFailException(str(exc)) from None
        except Exception as exc:  # OpenBao unreachable, timeouts: recorded, and retryable by Airflow
            common.record(context, "lease.failed", {"error": f"{type(exc).__name__}: {exc}"[:500],
                                                    "dataset": dataset}, actor="lease-broker")
            raise AirflowException(f"no lease issued: {type(exc).__name__}: {exc}") from None
        expires_at = datetime.now(UTC) + timedelta(seconds=issued.lease_duration)
        try:
            handover = lease_broker.hand_over(dataset, ident.run_key, issued)
            common.record(context, "lease.issued", {
                **issued.public(), "purpose": "training", "dataset": dataset,
                "dataset_table": approval["dataset_table"],
                "approved_sha256": (approval.get("dataset_digest") or {}).get("sha256"),
                "approval_id": approval["approval_id"], "decision_sha256": approval["decision_sha256"],
                "lease_number": len(earlier) + 1, "expires_at": expires_at.isoformat(),
                "handover": f"{settings.get('handover_mount')}/{handover}",
            }, actor="lease-broker")
        except BaseException:
            # An unrecorded or undeliverable credential must not exist: revoke its token (and with it the
            # lease) before failing with the original error.
            broker.abandon(client)
            raise
        if issued.lease_duration < ttl:
            self.log.warning("lease %s granted %ss, less than the %ss asked: the role's or token's maximum "
                             "caps it", issued.lease_id, issued.lease_duration, ttl)
        self.log.info("lease %s issued: role %s, %ss", issued.lease_id, issued.db_role, issued.lease_duration)
        return {"lease_id": issued.lease_id, "db_role": issued.db_role, "dataset": dataset,
                "ttl_seconds": issued.lease_duration, "expires_at": expires_at.isoformat(),
                "token_accessor": issued.token_accessor}


SERVICE_SCOPES = {"inference": "evaluation-suites", "catalog": "dataset-digests", "screen": "dataset-rows"}
# Service roles only the control plane logs in to (a task asking for one is refused): ``screen`` reads rows
PLANE_SERVICES = frozenset({"screen"})


def endpoint_secret(identity: TaskIdentity, kv_path: str, *, vault_conn_id: str | None = None) -> dict[str, str]:
    """The fields of a model endpoint's secret in OpenBao's backends mount (``OPENAI_API_KEY``, optional
    ``OPENAI_BASE_URL``), read with the ``endpoints`` identity, whose token is revoked at once. With a
    control plane only the control plane logs in to it; the values are masked in this process's logs."""
    from airflow.sdk.log import mask_secret

    from airflow_finetune_gov.vault.bootstrap import ENDPOINTS_ROLE

    try:
        client = GovernedLeaseHook(vault_conn_id).client(identity, role=ENDPOINTS_ROLE, purpose="endpoints")
    except broker.LeaseError as exc:
        raise AirflowFailException(f"{exc}: run `fgov vault bootstrap` (it creates the endpoints role)") from None
    try:
        values = broker.read_backend_secret(client, settings.get("backends_mount"), kv_path)
    except broker.LeaseError as exc:
        raise AirflowFailException(str(exc)) from None
    finally:
        with contextlib.suppress(Exception):
            client.auth.token.revoke_self()
    for value in values.values():
        mask_secret(value)
    return values


@contextmanager
def service_credentials(context: Any, service: str, *,
                        vault_conn_id: str | None = None) -> Iterator[broker.Credentials]:
    """A short service lease, revoked and verified when the block ends, whatever happens inside it.

    ``inference``: the evaluation task reads the evaluation suites and no training data.
    ``catalog``: the policy check reads a dataset's row count and content hash, never its rows.
    ``screen``: the policy check (in the control plane only) reads a dataset's rows to screen them.
    None ever shares a lease (or a token) with training.
    """
    scope = SERVICE_SCOPES[service]
    ttl = int(common.policy().lease["min_ttl_minutes"]) * 60
    common.record(context, "lease.requested", {"purpose": service, "vault_role": service, "ttl_seconds": ttl},
                  actor="lease-broker")
    hook = GovernedLeaseHook(vault_conn_id)
    try:
        client = hook.client(common.identity(context), role=service, purpose=service)
        issued = broker.LeaseBroker(client, settings.get("database_mount"), settings.get("handover_mount")).issue(
            service, ttl_seconds=ttl, wrap_ttl_seconds=60)
    except broker.LeaseError as exc:
        common.record(context, "lease.refused", {"purpose": service, "reason": str(exc)[:500]},
                      actor="lease-broker")
        raise AirflowFailException(str(exc)) from None
    try:
        common.record(context, "lease.issued", {
            **issued.public(), "purpose": service, "dataset": scope,
            "expires_at": (datetime.now(UTC) + timedelta(seconds=issued.lease_duration)).isoformat(),
        }, actor="lease-broker")
    except BaseException:
        broker.abandon(client)
        raise
    try:
        creds = broker.unwrap(common.vault_addr(hook.vault_conn_id), issued.wrap_token,
                              expected_digest=issued.wrap_token_sha256)
        mask_secret(creds.password)
        yield creds
    finally:
        revoke_run_leases(context, reason=f"{service} lease done", vault_conn_id=vault_conn_id,
                          purposes=(service,), lease_ids={issued.lease_id},
                          fallback=[{**issued.public(), "dataset": SERVICE_SCOPES[service]}])


@contextmanager
def service_connection(context: Any, service: str, *, vault_conn_id: str | None = None) -> Iterator[Any]:
    """A connection to the datasets database as a short ``service`` lease's role (``service_credentials``), closed
    before the lease is revoked."""
    with service_credentials(context, service, vault_conn_id=vault_conn_id) as creds, \
            common.datasets_connection(creds.username, creds.password) as conn:
        yield conn


def revoke_run_leases(context: Any, *, reason: str, vault_conn_id: str | None = None,
                      purposes: tuple[str, ...] = ("training",), lease_ids: set[str] | None = None,
                      fallback: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Revoke every lease of this run not yet verified gone; prove each on PostgreSQL; record all of it.

    ``purposes`` limits it to training leases by default: an evaluation task revokes its own
    inference lease, and the sweep catches any it could not. Raises if any lease could not be
    revoked and verified (the sweep finishes it later).

    If the governance database cannot be read, the leases come from ``fallback`` (or the XCom of
    this task's upstream lease tasks): they are revoked and proven gone all the same, and the task
    fails, since the revocation could not be recorded (see ``_revoke_unrecorded``).
    """
    if common.remote():  # revocation is the control plane's: this task holds no revoker identity
        if fallback is None and lease_ids is None:
            fallback = _upstream_leases(context)
        return common.control().revoke(reason=reason, purposes=purposes, lease_ids=lease_ids, fallback=fallback,
                                       log=context["task"].log)
    try:
        states = lifecycle.lease_states(common.run_events(context, event_prefix="lease.", every_incarnation=True))
    except LineageError as exc:
        known = fallback if fallback is not None else _upstream_leases(context)
        _revoke_unrecorded(context, known, exc, reason=reason, vault_conn_id=vault_conn_id)
    pending = [s for s in states.values() if not s.settled and s.purpose in purposes
               and (lease_ids is None or s.lease_id in lease_ids)]
    if not pending:
        return []

    def record(event_type: str, payload: dict[str, Any]) -> Any:
        return common.record(context, event_type, payload, actor="lease-broker")

    client, error = _revoker_client(context, vault_conn_id)
    if client is None:
        for lease in pending:
            record("lease.revoke_failed", {"lease_id": lease.lease_id, "db_role": lease.db_role,
                                           "reason": reason, "attempts": LOGIN_ATTEMPTS, "error": error})
        raise AirflowException(f"could not log in to revoke {len(pending)} lease(s) after {LOGIN_ATTEMPTS} "
                               f"attempts ({error}); they stay recorded as unrevoked and `fgov leases sweep` "
                               "will finish them")
    results = []
    for lease in pending:
        ok = lifecycle.revoke_and_verify(client, lease, monitor_url=settings.get("datasets_monitor_url"),
                                         handover_mount=settings.get("handover_mount"), record=record,
                                         reason=reason)
        results.append({"lease_id": lease.lease_id, "db_role": lease.db_role, "verified": ok})
    failed = [r for r in results if not r["verified"]]
    if failed:
        raise AirflowException(f"{len(failed)} lease(s) not revoked and verified: "
                               f"{[r['lease_id'] for r in failed]}; see lineage, `fgov leases sweep` retries")
    return results


def _revoker_client(context: Any, vault_conn_id: str | None) -> tuple[Any, str]:
    """Log in as the revoker, retrying a few times; ``(None, error)`` if OpenBao never answered."""
    hook = GovernedLeaseHook(vault_conn_id)
    error = ""
    for attempt in range(1, LOGIN_ATTEMPTS + 1):
        try:
            return hook.client(common.identity(context), role=REVOKER_ROLE, purpose="revoke"), ""
        except Exception as exc:  # OpenBao unreachable or refusing: retry, then record and leave it to the sweep
            error = f"login: {exc}"[:500]
            if attempt < LOGIN_ATTEMPTS:
                time.sleep(2 ** (attempt - 1))
    return None, error


def _upstream_leases(context: Any) -> list[dict[str, Any]]:
    """The leases this task's upstream lease tasks returned (their XCom: ids and role names, no secret)."""
    task = context["task"]
    values = context["ti"].xcom_pull(task_ids=sorted(task.upstream_task_ids), key="return_value")
    values = values if isinstance(values, list) else [values]
    return [v for v in values if isinstance(v, dict) and {"lease_id", "db_role", "token_accessor"} <= set(v)]


def _revoke_unrecorded(context: Any, leases: list[dict[str, Any]], error: LineageError, *, reason: str,
                       vault_conn_id: str | None) -> NoReturn:
    """The governance database is unavailable: a credential is never kept alive for want of a record.

    Revoke the run's known leases (only dynamic database leases of the configured mount), prove on
    PostgreSQL that their roles are gone, log each step, and fail: nothing about it could be recorded.
    Once the database is back, ``fgov leases sweep`` (or the ``fgov_lease_sweep`` DAG) finds the leases
    still unsettled in lineage, finds them already revoked, proves the roles gone and records it.
    """
    log = context["task"].log
    prefix = f"{settings.get('database_mount')}/creds/"
    leases = [lease for lease in leases if str(lease.get("lease_id", "")).startswith(prefix)]
    cause = f"the governance database is unavailable ({error})"
    if not leases:
        raise AirflowException(f"{cause} and this task knows no lease of the run: nothing revoked here. "
                               "Once the database is back, `fgov leases sweep` revokes whatever lineage "
                               "records as unsettled")
    client, login_error = _revoker_client(context, vault_conn_id)
    if client is None:
        raise AirflowException(f"{cause}, and OpenBao refused or did not answer the revoker ({login_error}): "
                               f"leases {[lease['lease_id'] for lease in leases]} stay live until their TTL "
                               "or `fgov leases sweep`")
    ident = common.identity(context)
    done = []
    for lease in leases:
        state = lifecycle.LeaseState(
            lease_id=lease["lease_id"], dag_id=ident.dag_id, run_id=ident.run_id, dataset=str(lease.get("dataset")),
            db_role=lease["db_role"], token_accessor=lease["token_accessor"], issued_at="",
            expires_at=lease.get("expires_at"))
        steps: list[str] = []

        def unrecorded(event_type: str, payload: dict[str, Any], steps: list[str] = steps) -> None:
            steps.append(event_type)

        verified = lifecycle.revoke_and_verify(
            client, state, monitor_url=settings.get("datasets_monitor_url"),
            handover_mount=settings.get("handover_mount"), reason=f"{reason} (governance database unavailable)",
            record=unrecorded)
        log.warning("lease %s: %s, NOT recorded (the governance database is unavailable)", lease["lease_id"],
                    " -> ".join(steps))
        done.append(f"{lease['lease_id']} ({'verified gone' if verified else 'NOT verified gone'})")
    raise AirflowException(f"{cause}: revoked the leases this task knows without recording it: "
                           f"{', '.join(done)}. The task fails, so nothing runs unrecorded; once the database is "
                           "back, `fgov leases sweep` (or the fgov_lease_sweep DAG) records the revocation")


class RevokeLeaseOperator(GovernedOpenLineageMixin, BaseOperator):
    """Teardown: revoke the run's leases (sync, retried) and verify on the database that they are gone;
    before that, cancel any remote tuning job of the run that no task saw end.

    Reads what to revoke from lineage, so a lease is revoked even if XCom was lost or tampered with.
    """

    ui_color = "#fce8e6"

    def __init__(self, *, vault_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vault_conn_id = vault_conn_id

    def execute(self, context: Any) -> dict[str, Any]:
        from airflow_finetune_gov.tuning.operators import settle_remote_jobs

        try:  # first, so the job's API key is still readable; never at the cost of the revocation
            for job in settle_remote_jobs(context, vault_conn_id=self.vault_conn_id):
                self.log.info("remote tuning job %s no task saw end: %s -> %s", job["remote_job_id"],
                              job["status_before"], job["status"])
        except Exception:
            self.log.exception("settling the run's remote tuning jobs failed; revoking its leases anyway")
        results = revoke_run_leases(context, reason="teardown", vault_conn_id=self.vault_conn_id)
        if not results:
            common.record(context, "lease.none", {"reason": "no unrevoked lease recorded for this run"},
                          actor="lease-broker")
        for r in results:
            self.log.info("lease %s revoked; role %s and its sessions gone: %s", r["lease_id"], r["db_role"],
                          r["verified"])
        return {"revoked": [r["lease_id"] for r in results]}


class LeaseSweepOperator(BaseOperator):
    """Revoke and verify leases whose runs have finished or whose TTL has passed (crashed workers,
    failed teardowns, OpenBao outages). Schedule it periodically; see ``dags/fgov_lease_sweep.py``."""

    ui_color = "#fce8e6"

    def __init__(self, *, vault_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.vault_conn_id = vault_conn_id

    def execute(self, context: Any) -> list[dict[str, Any]]:
        from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

        def run_state(dag_id: str, run_id: str) -> str | None:
            try:
                state = RuntimeTaskInstance.get_dagrun_state(dag_id=dag_id, run_id=run_id)
                return str(getattr(state, "value", state))
            except Exception:
                return None

        if common.remote():
            results = common.control().sweep(log=self.log)
        else:
            results = run_sweep(run_state, vault_conn_id=self.vault_conn_id)
        for r in results:
            self.log.info("lease %s of %s/%s (run %s): %s %s", r["lease_id"], r["dag_id"], r["run_id"],
                          r["run_state"], r["action"], r["detail"])
        if any(r["action"] == "failed" for r in results):
            raise AirflowException("some leases could not be revoked and verified; see lineage")
        return results


def run_sweep(run_state: Any, *, vault_conn_id: str | None = None, dry_run: bool = False) -> list[dict[str, Any]]:
    hook = GovernedLeaseHook(vault_conn_id)

    def client_for(lease: lifecycle.LeaseState) -> Any:
        ident = TaskIdentity(dag_id=lease.dag_id, run_id=lease.run_id, task_id=lifecycle.SWEEP_TASK_ID,
                             try_number=0)
        return hook.client(ident, role=REVOKER_ROLE, purpose="revoke")

    results = lifecycle.sweep(common.lineage_store(), run_state=run_state, client_for=client_for,
                              monitor_url=settings.get("datasets_monitor_url"),
                              handover_mount=settings.get("handover_mount"), dry_run=dry_run)
    return [r.__dict__ for r in results]

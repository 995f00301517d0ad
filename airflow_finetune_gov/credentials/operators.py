"""AcquireLeaseOperator (setup) and RevokeLeaseOperator (teardown)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval
from airflow_finetune_gov.credentials import broker
from airflow_finetune_gov.credentials.identity import load_key, mint
from airflow_finetune_gov.vault.bootstrap import REVOKER_ROLE, db_role_name, lease_role_name


def vault_client(context: Any, *, role: str, purpose: str, extra: dict[str, str] | None = None):
    """Log in to Vault/OpenBao with this task try's own workload-identity JWT (no static token)."""
    from airflow.providers.hashicorp.hooks.vault import VaultHook

    token = mint(
        common.identity(context),
        key_pem=load_key(settings.get("workload_identity_key_path")),
        issuer=settings.get("workload_identity_issuer"),
        audience=settings.get("workload_identity_audience"),
        purpose=purpose,
        extra=extra,
    )
    hook = VaultHook(vault_conn_id=settings.get("vault_conn_id"), auth_type="jwt", jwt_role=role,
                     jwt_token=token, auth_mount_point=settings.get("jwt_auth_mount"))
    return hook.get_conn()


class AcquireLeaseOperator(BaseOperator):
    """Issue dataset-scoped dynamic database credentials for an approved run.

    Checks the approval in lineage first (never the gate task's state), then logs in with a JWT whose
    ``dataset`` claim only the approved dataset's role accepts. Returns (XCom) the lease id, the
    role name and a single-use wrapping token - never the password.
    """

    ui_color = "#e6f4ea"

    def execute(self, context: Any) -> dict[str, Any]:
        ti = context["ti"]
        store = common.lineage_store()
        try:
            approval = granted_approval(store, ti.dag_id, ti.run_id)
        except ApprovalMissing as exc:
            common.record(context, "lease.refused", {"reason": str(exc)}, actor="lease-broker")
            raise AirflowFailException(f"no lease without a recorded approval: {exc}") from exc
        dataset = approval["dataset"]
        self.log.info("approval %s verified (tier %s, approvers %s); leasing dataset %s",
                      approval["approval_id"], approval["tier"], approval["approvers"] or ["policy"], dataset)
        client = vault_client(context, role=lease_role_name(dataset), purpose="lease",
                              extra={"dataset": dataset, "approval_id": approval["approval_id"]})
        lease_policy = common.policy().lease
        wrap_ttl = int(lease_policy["default_ttl_minutes"]) * 60
        issued = broker.LeaseBroker(client, settings.get("database_mount")).issue(
            db_role_name(dataset), wrap_ttl_seconds=wrap_ttl)
        expires_at = datetime.now(UTC) + timedelta(seconds=issued.lease_duration)
        try:
            common.record(context, "lease.issued", {
                **issued.public(), "dataset": dataset, "dataset_table": approval["dataset_table"],
                "approval_id": approval["approval_id"], "expires_at": expires_at.isoformat(),
            }, actor="lease-broker")
        except Exception:
            # An unrecorded credential must not exist: revoke it before failing.
            broker.revoke(client, issued.lease_id)
            raise
        self.log.info("lease %s issued: role %s, %ss", issued.lease_id, issued.db_role, issued.lease_duration)
        return {"lease_id": issued.lease_id, "db_role": issued.db_role, "dataset": dataset,
                "expires_at": expires_at.isoformat(), "wrap_token": issued.wrap_token}


def revoke_run_leases(context: Any, *, reason: str) -> list[dict[str, Any]]:
    """Revoke every lease this run was issued and has not yet revoked, then prove each is gone."""
    issued = [e.payload_dict() for e in common.run_events(context, "lease.issued")]
    done = {e.payload_dict()["lease_id"] for e in common.run_events(context, "lease.revoked")}
    pending = [p for p in issued if p["lease_id"] not in done]
    if not pending:
        return []
    client = vault_client(context, role=REVOKER_ROLE, purpose="revoke")
    monitor = settings.get("datasets_monitor_url")
    results = []
    for lease in pending:
        attempts = broker.revoke(client, lease["lease_id"])
        token_revoked = broker.revoke_token_accessor(client, lease["token_accessor"])
        proof = broker.verify_role_gone(monitor, lease["db_role"])
        for _ in range(20):  # pg_terminate_backend signals; the backend exits a moment later
            if proof["roles"] == 0 and proof["sessions"] == 0:
                break
            time.sleep(0.25)
            proof = broker.verify_role_gone(monitor, lease["db_role"])
        verified = proof["roles"] == 0 and proof["sessions"] == 0
        payload = {"lease_id": lease["lease_id"], "db_role": lease["db_role"], "attempts": attempts,
                   "token_revoked": token_revoked, "verified": verified, "remaining": proof, "reason": reason}
        common.record(context, "lease.revoked" if verified else "lease.revoke_unverified", payload,
                      actor="lease-broker")
        results.append(payload)
        if not verified:
            raise AirflowFailException(f"lease {lease['lease_id']} revoked but role {lease['db_role']} still "
                                       f"exists or has sessions: {proof}")
    return results


class RevokeLeaseOperator(BaseOperator):
    """Teardown: revoke the run's leases (sync, retried) and verify on the database that they are gone.

    Reads what to revoke from lineage, so a lease is revoked even if XCom was lost or tampered with.
    """

    ui_color = "#fce8e6"

    def execute(self, context: Any) -> dict[str, Any]:
        results = revoke_run_leases(context, reason="teardown")
        if not results:
            common.record(context, "lease.none", {"reason": "no unrevoked lease recorded for this run"},
                          actor="lease-broker")
        for r in results:
            self.log.info("lease %s revoked in %s attempt(s); role %s gone: %s", r["lease_id"], r["attempts"],
                          r["db_role"], r["verified"])
        return {"revoked": [r["lease_id"] for r in results]}

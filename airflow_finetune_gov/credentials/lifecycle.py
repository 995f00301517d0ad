"""Lease lifecycle from the lineage record: state of every lease, revoke-and-verify, and the sweep.

Pure (hvac + the lineage store, no Airflow import), so the teardown task, ``on_kill``, the sweep DAG
and ``fgov leases sweep`` share one implementation. What was issued, revoked and verified is read from
lineage, never from XCom; nothing is recorded as revoked before OpenBao confirmed it, and nothing as
verified before PostgreSQL shows the role and all of its sessions gone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hvac
import hvac.exceptions

from airflow_finetune_gov.credentials import broker
from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage.store import EventKey, LineageEvent, LineageStore

SWEEP_TASK_ID = "lease_sweep"
FINISHED_RUN_STATES = {"success", "failed"}

Recorder = Callable[[str, dict[str, Any]], Any]


@dataclass
class LeaseState:
    lease_id: str
    dag_id: str
    run_id: str
    dataset: str
    db_role: str
    token_accessor: str
    issued_at: str
    expires_at: str | None
    purpose: str = "training"  # training (the run's dataset) | inference (evaluation suites)
    status: str = "live"  # live | revoked (unverified) | revoke_failed | verified
    last_error: str | None = None
    renewals: int = 0
    events: list[str] = field(default_factory=list)

    @property
    def settled(self) -> bool:
        return self.status == "verified"

    def expired(self, now: datetime) -> bool:
        return bool(self.expires_at) and datetime.fromisoformat(str(self.expires_at)) <= now

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("lease_id", "dag_id", "run_id", "purpose", "dataset", "db_role",
                                              "issued_at", "expires_at", "status", "last_error", "renewals")}


def lease_states(events: Iterable[LineageEvent]) -> dict[str, LeaseState]:
    """Fold the ``lease.*`` events into one state per lease id."""
    states: dict[str, LeaseState] = {}
    for e in events:
        p = e.payload_dict()
        lease_id = p.get("lease_id")
        if not lease_id:
            continue
        if e.event_type == "lease.issued":
            states[lease_id] = LeaseState(lease_id=lease_id, dag_id=e.dag_id, run_id=e.run_id,
                                          dataset=p.get("dataset", ""), db_role=p["db_role"],
                                          token_accessor=p["token_accessor"], issued_at=e.created_at,
                                          expires_at=p.get("expires_at"), purpose=p.get("purpose", "training"))
            continue
        st = states.get(lease_id)
        if st is None:
            continue
        st.events.append(e.event_type)
        if e.event_type == "lease.renewed":
            st.renewals += 1
            st.expires_at = p.get("expires_at", st.expires_at)
        elif e.event_type == "lease.revoked":
            st.status = "revoked" if st.status != "verified" else st.status
        elif e.event_type == "lease.revoke_failed":
            if st.status != "verified":
                st.status = "revoke_failed"
            st.last_error = p.get("error")
        elif e.event_type == "lease.verify_failed":
            if st.status != "verified":
                st.status = "revoked"
            st.last_error = f"still present: {p.get('remaining')}"
        elif e.event_type == "lease.verified":
            st.status = "verified"
            st.last_error = None
    return states


def wait_role_gone(monitor_url: str, db_role: str, *, timeout: float = 5.0) -> dict[str, int]:
    """pg_terminate_backend only signals: give the backends a moment to exit before judging."""
    deadline = time.monotonic() + timeout
    proof = broker.verify_role_gone(monitor_url, db_role)
    while (proof["roles"] or proof["sessions"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        proof = broker.verify_role_gone(monitor_url, db_role)
    return proof


def revoke_and_verify(client: hvac.Client, lease: LeaseState, *, monitor_url: str, handover_mount: str,
                      record: Recorder, reason: str, attempts: int = 5, base_delay: float = 0.5) -> bool:
    """Revoke one lease (sync, retried), revoke the token that owned it, clear its hand-over, then prove
    on PostgreSQL that the role and its sessions are gone. Records every outcome; returns verified."""
    try:
        used = broker.revoke(client, lease.lease_id, attempts=attempts, base_delay=base_delay)
    except broker.LeaseError as exc:
        record("lease.revoke_failed", {"lease_id": lease.lease_id, "db_role": lease.db_role, "reason": reason,
                                       "error": str(exc)[:500]})
        return False
    token_revoked = broker.revoke_token_accessor(client, lease.token_accessor)
    handover_cleared = _clear_handovers(client, handover_mount, lease)
    record("lease.revoked", {"lease_id": lease.lease_id, "db_role": lease.db_role, "attempts": used,
                             "token_revoked": token_revoked, "handover_cleared": handover_cleared,
                             "reason": reason})
    proof = wait_role_gone(monitor_url, lease.db_role)
    verified = proof["roles"] == 0 and proof["sessions"] == 0
    record("lease.verified" if verified else "lease.verify_failed",
           {"lease_id": lease.lease_id, "db_role": lease.db_role, "remaining": proof,
            "checked_at": datetime.now(UTC).isoformat()})
    return verified


def _clear_handovers(client: hvac.Client, mount: str, lease: LeaseState) -> bool:
    from airflow_finetune_gov.credentials.identity import run_key

    path = broker.handover_path(lease.dataset, run_key(lease.dag_id, lease.run_id), lease.lease_id)
    try:
        client.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=mount)
        return True
    except hvac.exceptions.VaultError:
        return False


@dataclass
class SweepResult:
    lease_id: str
    dag_id: str
    run_id: str
    run_state: str | None
    action: str  # revoked | failed | skipped
    detail: str = ""


def sweep(store: LineageStore, *, run_state: Callable[[str, str], str | None],
          client_for: Callable[[LeaseState], hvac.Client], monitor_url: str, handover_mount: str,
          dry_run: bool = False, now: datetime | None = None, attempts: int = 3) -> list[SweepResult]:
    """Revoke and verify every unsettled lease whose run has finished (or vanished) or that has expired.

    The net for crashed workers and failed teardowns. Leases of runs still running and not yet
    expired are left to their own teardown.
    """
    now = now or datetime.now(UTC)
    results: list[SweepResult] = []
    for lease in lease_states(store.events(event_prefix="lease.")).values():
        if lease.settled:
            continue
        state = run_state(lease.dag_id, lease.run_id)
        due = state is None or state in FINISHED_RUN_STATES or lease.expired(now)
        if not due:
            results.append(SweepResult(lease.lease_id, lease.dag_id, lease.run_id, state, "skipped",
                                       "run still active and lease not expired"))
            continue
        if dry_run:
            results.append(SweepResult(lease.lease_id, lease.dag_id, lease.run_id, state, "would revoke"))
            continue
        key = EventKey(lease.dag_id, lease.run_id, SWEEP_TASK_ID, 0)

        def record(event_type: str, payload: dict[str, Any], key: EventKey = key) -> Any:
            return events.record(store, key, event_type, actor="lease-sweep", payload=payload)

        reason = f"sweep: run {state or 'not found'}" + (", lease expired" if lease.expired(now) else "")
        try:
            client = client_for(lease)
        except Exception as exc:
            record("lease.revoke_failed", {"lease_id": lease.lease_id, "db_role": lease.db_role,
                                           "reason": reason, "error": f"login: {exc}"[:500]})
            results.append(SweepResult(lease.lease_id, lease.dag_id, lease.run_id, state, "failed", str(exc)))
            continue
        ok = revoke_and_verify(client, lease, monitor_url=monitor_url, handover_mount=handover_mount,
                               record=record, reason=reason, attempts=attempts)
        results.append(SweepResult(lease.lease_id, lease.dag_id, lease.run_id, state,
                                   "revoked" if ok else "failed", "" if ok else "see lineage"))
    return results

"""Folding lease events into lease states (pure: events built in memory, no database)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from airflow_finetune_gov.credentials.lifecycle import lease_states
from airflow_finetune_gov.lineage.store import LineageEvent


def ev(kind: str, **payload: object) -> LineageEvent:
    return LineageEvent(dag_id="d", run_id="r", task_id="t", try_number=1, map_index=-1, event_type=kind,
                        actor="x", created_at="2026-11-28T00:00:00+00:00", payload=json.dumps(payload),
                        prev_hash=None, prev_run_hash=None, hash="h")


ISSUED = {"lease_id": "L1", "db_role": "v-1", "token_accessor": "acc", "dataset": "benign",
          "expires_at": "2026-11-28T01:00:00+00:00"}


def test_a_lease_is_settled_only_once_verified() -> None:
    assert lease_states([ev("lease.issued", **ISSUED)])["L1"].status == "live"
    s = lease_states([ev("lease.issued", **ISSUED), ev("lease.revoked", lease_id="L1")])["L1"]
    assert s.status == "revoked" and not s.settled
    s = lease_states([ev("lease.issued", **ISSUED), ev("lease.revoke_failed", lease_id="L1", error="down")])["L1"]
    assert s.status == "revoke_failed" and s.last_error == "down" and not s.settled
    s = lease_states([ev("lease.issued", **ISSUED), ev("lease.revoke_failed", lease_id="L1", error="down"),
                      ev("lease.revoked", lease_id="L1"), ev("lease.verified", lease_id="L1")])["L1"]
    assert s.settled and s.last_error is None
    s = lease_states([ev("lease.issued", **ISSUED), ev("lease.revoked", lease_id="L1"),
                      ev("lease.verify_failed", lease_id="L1", remaining={"roles": 1, "sessions": 0})])["L1"]
    assert s.status == "revoked" and "roles" in str(s.last_error)


def test_renewal_moves_the_expiry_and_expiry_is_judged_against_now() -> None:
    later = "2026-11-28T03:00:00+00:00"
    s = lease_states([ev("lease.issued", **ISSUED), ev("lease.renewed", lease_id="L1", expires_at=later)])["L1"]
    assert s.renewals == 1 and s.expires_at == later
    assert s.expired(datetime(2026, 11, 28, 4, tzinfo=UTC))
    assert not s.expired(datetime(2026, 11, 28, 2, tzinfo=UTC) - timedelta(minutes=1))


def test_events_of_unknown_leases_are_ignored() -> None:
    assert lease_states([ev("lease.revoked", lease_id="nope"), ev("lease.refused", reason="no approval")]) == {}

"""Pure parts of the lease broker: TTL derivation, the renewal loop, hand-over paths, claims."""

from __future__ import annotations

import threading
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from airflow_finetune_gov.credentials import broker
from airflow_finetune_gov.credentials.identity import TaskIdentity, mint, run_key

BOUNDS = {"default_seconds": 1800, "min_seconds": 300, "max_seconds": 14400}


def test_ttl_is_expected_duration_with_margin_within_policy_bounds() -> None:
    assert broker.derive_ttl(None, **BOUNDS) == 1800
    assert broker.derive_ttl(3600, **BOUNDS) == 5400
    assert broker.derive_ttl(10, **BOUNDS) == 300  # never below the floor
    assert broker.derive_ttl(24 * 3600, **BOUNDS) == 14400  # capped: renewal cannot pass this either
    assert broker.derive_ttl(1000, margin=2.0, **BOUNDS) == 2000
    with pytest.raises(broker.LeaseError, match="positive"):
        broker.derive_ttl(0, **BOUNDS)


def test_keeper_renews_at_half_ttl_and_follows_the_granted_ttl() -> None:
    calls: list[float] = []
    granted: list[int] = []

    def renew() -> int:
        calls.append(time.monotonic())
        return 1  # the server grants less each time (a cap): the keeper renews sooner

    keeper = broker.LeaseKeeper(renew, 1, on_renewed=granted.append, min_interval=0.05)
    keeper._interval = 0.1  # a 0.2 s lease, for speed
    with keeper:
        time.sleep(0.5)
    assert keeper.renewals >= 1 and granted and set(granted) == {1}
    n = len(calls)
    time.sleep(0.3)
    assert len(calls) == n, "the keeper renewed after being stopped"


def test_keeper_reports_errors_and_retries_sooner() -> None:
    errors: list[BaseException] = []
    attempts = threading.Event()
    count = {"n": 0}

    def renew() -> int:
        count["n"] += 1
        if count["n"] >= 3:
            attempts.set()
        raise broker.LeaseError("openbao unreachable")

    keeper = broker.LeaseKeeper(renew, 1, on_error=errors.append, min_interval=0.05)
    keeper._interval = 0.1
    with keeper:
        assert attempts.wait(5)
    assert len(errors) >= 3 and keeper.renewals == 0
    assert all("unreachable" in str(e) for e in errors)


def test_handover_path_is_per_run_and_per_lease_and_path_safe() -> None:
    a = broker.handover_path("benign", run_key("d", "manual__2026-11-28T11:08:33+00:00"), "fgov-database/creds/x/1")
    b = broker.handover_path("benign", run_key("d", "manual__2026-11-28T11:08:34+00:00"), "fgov-database/creds/x/1")
    c = broker.handover_path("benign", run_key("d", "manual__2026-11-28T11:08:33+00:00"), "fgov-database/creds/x/2")
    assert len({a, b, c}) == 3
    assert all(p.count("/") == 2 and ":" not in p and "+" not in p for p in (a, b, c))


def test_workload_token_names_one_task_try_and_extras_cannot_override_it() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    ident = TaskIdentity("dag", "run-1", "tune", 2)
    token = mint(ident, key_pem=pem, issuer="i", audience="a", purpose="tune", extra={"dataset": "benign"})
    claims = jwt.decode(token, key.public_key(), algorithms=["ES256"], audience="a")
    assert claims["sub"] == "dag/run-1/tune/2" and claims["try_number"] == "2"
    assert claims["run_key"] == run_key("dag", "run-1") and claims["dataset"] == "benign"
    assert claims["exp"] - claims["iat"] <= 300
    with pytest.raises(ValueError, match="run_id"):
        mint(ident, key_pem=pem, issuer="i", audience="a", purpose="tune", extra={"run_id": "other-run"})


def test_credentials_repr_hides_the_password() -> None:
    assert "s3cret" not in repr(broker.Credentials("v-role", "s3cret"))

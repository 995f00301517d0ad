"""The lease broker against the embedded stack's real OpenBao and PostgreSQL.

Logins use workload-identity JWTs signed with the stack's key, exactly as tasks do; the assertions
look at PostgreSQL itself (what the leased role can read, whether it and its sessions still exist).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import psycopg
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from airflow_finetune_gov.credentials import broker, lifecycle
from airflow_finetune_gov.credentials.identity import TaskIdentity, mint
from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DB_MOUNT = "fgov-database"
HANDOVER = "fgov-handover"


class Env:
    def __init__(self, stack: Stack) -> None:
        state = stack.load()
        assert state is not None
        self.state = state
        self.addr = state["openbao"]["addr"]
        self.key = Path(state["workload_identity_key"]).read_bytes()
        self.pg_port = state["postgres"]["port"]
        self.pg_password = Path(state["postgres"]["superuser_password_file"]).read_text()
        self.root = hvac.Client(url=self.addr, token=Path(state["openbao"]["root_token_file"]).read_text())
        cfg = (Path(state["airflow"]["home"]) / "airflow.cfg").read_text()
        self.monitor_url = next(line.split("=", 1)[1].strip() for line in cfg.splitlines()
                                if line.startswith("datasets_monitor_url"))

    def login(self, role: str, ident: TaskIdentity, purpose: str, key: bytes | None = None,
              ttl: int = 300, **extra: str) -> hvac.Client:
        token = mint(ident, key_pem=key or self.key, issuer="airflow-finetune-gov", audience="openbao",
                     purpose=purpose, extra=extra or None, ttl_seconds=ttl)
        client = hvac.Client(url=self.addr, timeout=10)
        client.auth.jwt.jwt_login(role=role, jwt=token, path="fgov-jwt")
        return client

    def connect(self, user: str, password: str, db: str = "fgov_datasets") -> psycopg.Connection:
        return psycopg.connect(host="127.0.0.1", port=self.pg_port, user=user, password=password, dbname=db,
                               autocommit=True, connect_timeout=5)

    def superuser(self) -> psycopg.Connection:
        return self.connect("postgres", self.pg_password, "postgres")

    def role_exists(self, role: str) -> bool:
        with self.superuser() as conn:
            return conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone() == (1,)

    def leases(self, db_role: str = "ds-benign") -> set[str]:
        try:
            resp = self.root.adapter.list(f"/v1/sys/leases/lookup/{DB_MOUNT}/creds/{db_role}/")
        except hvac.exceptions.InvalidPath:
            return set()
        body = resp if isinstance(resp, dict) else resp.json()
        return set(body["data"]["keys"])


@pytest.fixture(scope="module")
def env(stack: Stack) -> Env:
    return Env(stack)


def ident(task: str = "acquire_lease", run: str | None = None) -> TaskIdentity:
    return TaskIdentity("lease_tests", run or f"manual__{uuid.uuid4().hex}", task, 1)


def issue(env: Env, who: TaskIdentity, ttl: int = 300) -> tuple[hvac.Client, broker.IssuedLease]:
    client = env.login("lease-benign", who, "lease", dataset="benign", approval_id="42")
    return client, broker.LeaseBroker(client, DB_MOUNT, HANDOVER).issue("ds-benign", ttl_seconds=ttl,
                                                                         wrap_ttl_seconds=ttl)


def revoker(env: Env, who: TaskIdentity) -> hvac.Client:
    return env.login("revoker", TaskIdentity(who.dag_id, who.run_id, "revoke_lease", 1), "revoke")


def state_of(lease: broker.IssuedLease, who: TaskIdentity, dataset: str = "benign") -> lifecycle.LeaseState:
    return lifecycle.LeaseState(lease_id=lease.lease_id, dag_id=who.dag_id, run_id=who.run_id, dataset=dataset,
                                db_role=lease.db_role, token_accessor=lease.token_accessor, issued_at="",
                                expires_at=None)


def settle(env: Env, lease: broker.IssuedLease, who: TaskIdentity, dataset: str = "benign", *,
           record: lifecycle.Recorder = lambda *a: None, reason: str = "test") -> bool:
    """Revoke a lease as the revoker of ``who``'s run and prove it gone on PostgreSQL."""
    return lifecycle.revoke_and_verify(revoker(env, who), state_of(lease, who, dataset), monitor_url=env.monitor_url,
                                       handover_mount=HANDOVER, record=record, reason=reason)


@pytest.fixture
def leased(env: Env) -> Iterator[dict[str, Any]]:
    who = ident()
    client, lease = issue(env, who)
    creds = broker.unwrap(env.addr, lease.wrap_token, expected_digest=lease.wrap_token_sha256)
    yield {"who": who, "client": client, "lease": lease, "creds": creds}
    settle(env, lease, who, reason="test cleanup")


def test_leased_role_reads_the_approved_table_and_nothing_else(env: Env, leased: dict[str, Any]) -> None:
    creds, lease = leased["creds"], leased["lease"]
    assert creds.username == lease.db_role and lease.lease_duration == 300 and lease.requested_ttl == 300
    with env.connect(creds.username, creds.password) as conn:
        assert conn.execute("SELECT count(*) FROM datasets.benign").fetchone()[0] > 0
        for statement in ("SELECT * FROM datasets.poisoned",
                          "INSERT INTO datasets.benign (prompt, response) VALUES ('x', 'y')",
                          "DELETE FROM datasets.benign",
                          "CREATE TABLE datasets.mine (x int)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    for other_db in ("fgov_governance", "airflow"):
        with pytest.raises(psycopg.OperationalError, match="permission denied"):
            env.connect(creds.username, creds.password, other_db)
    with env.superuser() as conn:  # the leased role owns nothing and expires on its own
        row = conn.execute("SELECT rolvaliduntil IS NOT NULL, rolcanlogin FROM pg_roles WHERE rolname = %s",
                           (creds.username,)).fetchone()
        assert row == (True, True)


def test_revocation_terminates_open_sessions_and_is_verified(env: Env) -> None:
    who = ident()
    _, lease = issue(env, who)
    creds = broker.unwrap(env.addr, lease.wrap_token, expected_digest=lease.wrap_token_sha256)
    session = env.connect(creds.username, creds.password)
    assert session.execute("SELECT 1").fetchone() == (1,)
    events: list[tuple[str, dict[str, Any]]] = []
    ok = settle(env, lease, who, record=lambda k, p: events.append((k, p)))
    assert ok and [k for k, _ in events] == ["lease.revoked", "lease.verified"]
    assert events[1][1]["remaining"] == {"roles": 0, "sessions": 0}
    assert events[0][1]["token_revoked"] is True
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")  # the open session was terminated, not just the role dropped
    session.close()
    assert not env.role_exists(creds.username)
    assert lease.lease_id.rsplit("/", 1)[1] not in env.leases()
    with pytest.raises(hvac.exceptions.VaultError):  # the token that owned the lease is gone as well
        env.root.auth.token.lookup_accessor(lease.token_accessor)


def test_handover_is_for_the_same_runs_tuning_task_only_and_only_once(env: Env) -> None:
    who = ident()
    client, lease = issue(env, who)
    broker.LeaseBroker(client, DB_MOUNT, HANDOVER).hand_over("benign", who.run_key, lease)
    other = ident("tune")
    thief = env.login("tune-benign", other, "tune", dataset="benign")
    with pytest.raises(broker.LeaseError, match=r"refused|no credential hand-over"):
        broker.take_handover(thief, HANDOVER, "benign", who.run_key, lease.lease_id)
    with pytest.raises(hvac.exceptions.VaultError):  # the lease identity cannot read it back either
        client.secrets.kv.v2.read_secret_version(path=broker.handover_path("benign", who.run_key, lease.lease_id),
                                                 mount_point=HANDOVER, raise_on_deleted_version=True)
    tuner = env.login("tune-benign", TaskIdentity(who.dag_id, who.run_id, "tune", 1), "tune", dataset="benign")
    token = broker.take_handover(tuner, HANDOVER, "benign", who.run_key, lease.lease_id)
    assert token == lease.wrap_token
    with pytest.raises(broker.LeaseError, match="already taken"):
        broker.take_handover(tuner, HANDOVER, "benign", who.run_key, lease.lease_id)
    with pytest.raises(broker.LeaseError, match="not the one recorded"):
        broker.unwrap(env.addr, "s." + "x" * 24, expected_digest=lease.wrap_token_sha256)
    creds = broker.unwrap(env.addr, token, expected_digest=lease.wrap_token_sha256)
    with pytest.raises(broker.LeaseError, match=r"already used|invalid"):
        broker.unwrap(env.addr, token, expected_digest=lease.wrap_token_sha256)
    assert creds.username == lease.db_role
    assert settle(env, lease, who)


def test_renewal_extends_the_lease_and_the_roles_valid_until(env: Env, leased: dict[str, Any]) -> None:
    lease, who = leased["lease"], leased["who"]

    def valid_until() -> Any:
        with env.superuser() as conn:
            return conn.execute("SELECT rolvaliduntil FROM pg_roles WHERE rolname = %s",
                                (lease.db_role,)).fetchone()[0]

    before = valid_until()
    tuner = env.login("tune-benign", TaskIdentity(who.dag_id, who.run_id, "tune", 1), "tune", dataset="benign")
    granted = broker.renew(tuner, lease.lease_id, 900)
    assert granted == 900
    assert (valid_until() - before).total_seconds() > 500
    # The cap: never past the policy's max TTL (240 min), which is also the owning token's lifetime.
    assert broker.renew(tuner, lease.lease_id, 10 * 24 * 3600) <= 240 * 60
    other_ds = env.login("tune-poisoned", TaskIdentity(who.dag_id, who.run_id, "tune", 1), "tune",
                         dataset="poisoned")
    with pytest.raises(broker.LeaseError, match="refused"):
        broker.renew(other_ds, lease.lease_id, 900)


def test_keeper_keeps_a_short_lease_alive_and_an_unrenewed_lease_expires(env: Env) -> None:
    who = ident()
    _, lease = issue(env, who, ttl=4)
    assert lease.lease_duration == 4
    tuner = env.login("tune-benign", TaskIdentity(who.dag_id, who.run_id, "tune", 1), "tune", dataset="benign")
    renewed: list[int] = []
    with broker.LeaseKeeper(lambda: broker.renew(tuner, lease.lease_id, 4), 4, on_renewed=renewed.append):
        time.sleep(7)
        assert env.role_exists(lease.db_role)
    assert len(renewed) >= 2
    deadline = time.monotonic() + 20
    while env.role_exists(lease.db_role) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not env.role_exists(lease.db_role), "OpenBao did not revoke the expired lease's role"


def test_forged_expired_and_misdirected_identities_get_no_credential(env: Env) -> None:
    before = env.leases()
    stranger = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    who = ident()
    attempts = {
        "forged": lambda: env.login("lease-benign", who, "lease", key=stranger, dataset="benign", approval_id="1"),
        "expired": lambda: env.login("lease-benign", who, "lease", ttl=-120, dataset="benign", approval_id="1"),
        "other dataset": lambda: env.login("lease-benign", who, "lease", dataset="poisoned", approval_id="1"),
        "wrong purpose": lambda: env.login("lease-benign", who, "tune", dataset="benign"),
        "no approval id": lambda: env.login("lease-benign", who, "lease", dataset="benign"),
        "no such dataset": lambda: env.login("lease-secret", who, "lease", dataset="secret", approval_id="1"),
    }
    for name, attempt in attempts.items():
        with pytest.raises(hvac.exceptions.VaultError):
            attempt()
            pytest.fail(f"{name} identity logged in")
    tuner = env.login("tune-benign", ident("tune"), "tune", dataset="benign")
    with pytest.raises(broker.LeaseError, match="does not cover"):
        broker.LeaseBroker(tuner, DB_MOUNT, HANDOVER).issue("ds-benign", ttl_seconds=60, wrap_ttl_seconds=60)
    lease_client = env.login("lease-benign", who, "lease", dataset="benign", approval_id="1")
    with pytest.raises(broker.LeaseError, match="does not cover"):
        broker.LeaseBroker(lease_client, DB_MOUNT, HANDOVER).issue("ds-poisoned", ttl_seconds=60,
                                                                   wrap_ttl_seconds=60)
    assert env.leases() == before, "a refused request left a credential behind"


def test_audit_log_names_the_run_behind_a_credential_request(env: Env, leased: dict[str, Any]) -> None:
    who = leased["who"]
    entries = [json.loads(line) for line in Path(env.state["openbao"]["audit_log"]).read_text().splitlines()]
    requests = [e for e in entries if e.get("type") == "request"
                and e["request"]["path"] == f"{DB_MOUNT}/creds/ds-benign"
                and e["auth"].get("metadata", {}).get("run_id") == who.run_id]
    assert requests, "no audit entry for the credential request names the run"
    meta = requests[-1]["auth"]["metadata"]
    assert meta["dag_id"] == who.dag_id and meta["task_id"] == "acquire_lease" and meta["approval_id"] == "42"


def test_inference_and_training_leases_never_overlap(env: Env, leased: dict[str, Any]) -> None:
    who = ident("evaluate")
    client = env.login("inference", who, "inference")
    inference = broker.LeaseBroker(client, DB_MOUNT, HANDOVER).issue("inference", ttl_seconds=300,
                                                                     wrap_ttl_seconds=60)
    creds = broker.unwrap(env.addr, inference.wrap_token, expected_digest=inference.wrap_token_sha256)
    try:
        with env.connect(creds.username, creds.password) as conn:
            assert conn.execute("SELECT count(*) FROM evaluation.suites").fetchone()[0] >= 1
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM datasets.benign")
        training = leased["creds"]
        with env.connect(training.username, training.password) as conn, \
                pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM evaluation.suites")  # the held-out prompts stay held out
        with pytest.raises(broker.LeaseError, match="does not cover"):
            broker.LeaseBroker(client, DB_MOUNT, HANDOVER).issue("ds-benign", ttl_seconds=60, wrap_ttl_seconds=60)
        assert inference.token_accessor != leased["lease"].token_accessor
    finally:
        assert settle(env, inference, who, "evaluation-suites")


def test_hook_refusals_name_the_problem(env: Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GovernedLeaseHook (over the HashiCorp provider's VaultHook) against the real OpenBao."""
    from airflow_finetune_gov.credentials.hook import GovernedLeaseHook

    port = env.addr.rsplit(":", 1)[1]
    conn = {"conn_type": "vault", "host": "127.0.0.1", "port": int(port),
            "extra": {"auth_type": "jwt", "use_tls": False}}
    monkeypatch.setenv("AIRFLOW_CONN_FGOV_TEST_VAULT", json.dumps(conn))
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__WORKLOAD_IDENTITY_KEY_PATH", str(env.state["workload_identity_key"]))
    hook = GovernedLeaseHook("fgov_test_vault")
    who = ident()
    client = hook.client(who, role="lease-benign", purpose="lease", extra={"dataset": "benign", "approval_id": "7"})
    assert client.is_authenticated()
    with pytest.raises(broker.LeaseError, match=r"no JWT role 'lease-secret'.*fgov vault bootstrap"):
        hook.client(who, role="lease-secret", purpose="lease", extra={"dataset": "secret", "approval_id": "7"})
    with pytest.raises(broker.LeaseError, match="refused this task's workload identity for role 'lease-poisoned'"):
        hook.client(who, role="lease-poisoned", purpose="lease", extra={"dataset": "benign", "approval_id": "7"})
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__WORKLOAD_IDENTITY_KEY_PATH", str(stranger))
    with pytest.raises(broker.LeaseError, match="signed by another key"):
        hook.client(who, role="lease-benign", purpose="lease", extra={"dataset": "benign", "approval_id": "7"})
    monkeypatch.setenv("AIRFLOW_CONN_FGOV_TEST_VAULT", json.dumps({**conn, "extra": {"auth_type": "token"}}))
    with pytest.raises(broker.LeaseError, match="static Vault token"):
        GovernedLeaseHook("fgov_test_vault").client(who, role="lease-benign", purpose="lease")


def test_cli_sweep_revokes_a_lease_whose_run_is_gone(env: Env, stack: Stack) -> None:
    """A worker died after recording its lease, and its run no longer exists in Airflow."""
    import os
    import subprocess
    import sys
    from datetime import UTC, datetime, timedelta

    from airflow_finetune_gov.lineage.store import EventKey, LineageStore

    # The sweep DAG's own scheduled run at start-up would race the CLI for this lease: let it finish.
    from airflow_finetune_gov.stack.client import AirflowClient

    auditor = AirflowClient(env.state["airflow"]["url"], "auditor", stack.airflow_password("auditor"))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        runs = auditor.request("GET", "/dags/fgov_lease_sweep/dagRuns").json().get("dag_runs", [])
        if runs and all(r["state"] in ("success", "failed") for r in runs):
            break
        time.sleep(1)
    else:
        pytest.fail("the scheduled lease sweep never ran on the test stack")
    assert {r["state"] for r in runs} == {"success"}, runs
    who = ident()
    _, lease = issue(env, who)
    store = LineageStore(Path(env.state["governance_db_url_file"]).read_text())
    store.record(EventKey(who.dag_id, who.run_id, who.task_id, 1), "lease.issued", actor="lease-broker", payload={
        **lease.public(), "purpose": "training", "dataset": "benign",
        "expires_at": (datetime.now(UTC) + timedelta(seconds=lease.lease_duration)).isoformat()})
    env_vars = {k: v for k, v in os.environ.items() if k != "AIRFLOW_HOME" and not k.startswith("AIRFLOW__")}
    cli = [sys.executable, "-m", "airflow_finetune_gov.cli.main", "--state-dir", str(stack.dir), "leases"]
    swept = subprocess.run([*cli, "sweep"], env=env_vars, capture_output=True, text=True, timeout=300)
    assert swept.returncode == 0, swept.stdout + swept.stderr
    assert f"revoked       {lease.lease_id}  run {who.dag_id}/{who.run_id} (not found)" in swept.stdout
    kinds = [(e.event_type, e.task_id) for e in store.events(run_id=who.run_id)]
    assert kinds == [("lease.issued", "acquire_lease"), ("lease.revoked", "lease_sweep"),
                     ("lease.verified", "lease_sweep")]
    assert not env.role_exists(lease.db_role)


def test_catalog_lease_reads_digests_but_never_rows(env: Env, leased: dict[str, Any]) -> None:
    from airflow_finetune_gov.tuning.backends import rows_sha256

    who = ident("policy_check")
    client = env.login("catalog", who, "catalog")
    lease = broker.LeaseBroker(client, DB_MOUNT, HANDOVER).issue("catalog", ttl_seconds=300, wrap_ttl_seconds=60)
    creds = broker.unwrap(env.addr, lease.wrap_token, expected_digest=lease.wrap_token_sha256)
    try:
        with env.connect(creds.username, creds.password) as conn:
            count, digest = conn.execute("SELECT * FROM catalog.dataset_digest('datasets.benign')").fetchone()
            for statement in ("SELECT * FROM datasets.benign", "SELECT * FROM evaluation.suites"):
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute(statement)
            for bad in ("evaluation.suites", "datasets.benign; DROP TABLE datasets.benign", "pg_authid"):
                with pytest.raises(psycopg.errors.RaiseException, match="not a dataset table"):
                    conn.execute("SELECT * FROM catalog.dataset_digest(%s)", (bad,))
        training = leased["creds"]
        with env.connect(training.username, training.password) as conn:
            rows = [(str(p), str(r)) for p, r in conn.execute(
                "SELECT prompt, response FROM datasets.benign ORDER BY id").fetchall()]
        assert count == len(rows) and digest == rows_sha256(rows)  # PostgreSQL and Python agree
    finally:
        assert settle(env, lease, who, "dataset-digests")


def test_a_failure_after_issue_leaves_no_credential_and_keeps_the_cause(env: Env,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    who = ident()
    client = env.login("lease-benign", who, "lease", dataset="benign", approval_id="9")
    before = env.leases()

    def benign_roles() -> int:
        with env.superuser() as conn:
            row = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname LIKE 'v-fgov-jwt-ds-benig-%'").fetchone()
        assert row is not None
        return int(row[0])

    roles_before = benign_roles()

    def broken_wrap(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("wrapping endpoint unavailable")

    monkeypatch.setattr(client.sys, "wrap", broken_wrap)
    with pytest.raises(RuntimeError, match="wrapping endpoint unavailable"):
        broker.LeaseBroker(client, DB_MOUNT, HANDOVER).issue("ds-benign", ttl_seconds=300, wrap_ttl_seconds=300)
    deadline = time.monotonic() + 30  # OpenBao revokes a revoked token's leases in the background
    while (env.leases() != before or benign_roles() != roles_before) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert env.leases() == before, "the credential issued before the failure is still leased"
    assert benign_roles() == roles_before  # its role is gone from PostgreSQL, not just forgotten by OpenBao
    with pytest.raises(hvac.exceptions.VaultError):
        client.auth.token.lookup_self()  # the lease identity's token was revoked with it

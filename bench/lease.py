"""Benchmark: the governed lease cycle (issue + revoke + verify) versus raw hvac, on the embedded real stack.

Both operations run in the same process against the same OpenBao and PostgreSQL, interleaved
(governed, raw, governed, raw, ...) after a few warm-up iterations, so drift hits both alike.

- governed: ``LeaseBroker.issue("ds-benign")`` with a workload-identity client (JWT role
  ``lease-benign``), then ``lifecycle.revoke_and_verify`` with a revoker client (JWT role ``revoker``).
  ``revoke_and_verify`` also revokes the token that owned the lease, so a fresh lease client logs in
  before every iteration; the JWT logins happen outside the timed section and are reported apart.
- raw: hvac with the root token: ``secrets.database.generate_credentials`` then ``sys.revoke_lease``.

Starts a fresh embedded stack in a temporary directory (with an empty DAGs folder: no DAG runs
compete with the measurement) and stops it afterwards, unless ``--state-dir`` names a running stack,
which is then used and left running. Goals: governed p50 / raw p50 <= 1.5 and governed p50 <= 60 ms.

    .venv/bin/python bench/lease.py [--iterations N] [--warmup N] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hvac  # noqa: E402
import psycopg  # noqa: E402
from psycopg.conninfo import make_conninfo  # noqa: E402

from airflow_finetune_gov.credentials import broker, lifecycle  # noqa: E402
from airflow_finetune_gov.credentials.identity import TaskIdentity, mint  # noqa: E402
from airflow_finetune_gov.stack.manager import Stack, StackOptions  # noqa: E402
from bench.common import pct, result  # noqa: E402

DB_ROLE = "ds-benign"
DATASET = "benign"
LEASE_TTL = 300
RATIO_GOAL = 1.5
P50_GOAL_MS = 60.0
REVOKER_RELOGIN_SECONDS = 300.0  # the revoker role's tokens live 10 min: log in again well before
ROLE_PATTERNS = ("v-fgov-jwt-%", "v-root-%")


class Env:
    """What the bench needs from a running stack (same sources as tests/credentials/test_lease_on_stack.py)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.addr: str = state["openbao"]["addr"]
        self.db_mount: str = state["openbao"].get("database_mount", "fgov-database")
        self.jwt_mount: str = state["openbao"].get("jwt_mount", "fgov-jwt")
        self.handover_mount = "fgov-handover"
        self.key = Path(state["workload_identity_key"]).read_bytes()
        self.root = hvac.Client(url=self.addr, token=Path(state["openbao"]["root_token_file"]).read_text(),
                                timeout=10)
        cfg = (Path(state["airflow"]["home"]) / "airflow.cfg").read_text()
        for line in cfg.splitlines():
            if line.startswith("handover_mount"):
                self.handover_mount = line.split("=", 1)[1].strip() or self.handover_mount
        self.monitor_url = next(line.split("=", 1)[1].strip() for line in cfg.splitlines()
                                if line.startswith("datasets_monitor_url"))
        pg = state["postgres"]
        pw_file = pg.get("superuser_password_file")
        self.superuser_dsn: str | None = None
        if pw_file:
            self.superuser_dsn = make_conninfo(
                host=pg.get("host", "127.0.0.1"), port=pg["port"], user="postgres",
                password=Path(pw_file).read_text(), dbname="postgres", connect_timeout=5)

    def login(self, role: str, ident: TaskIdentity, purpose: str, **extra: str) -> hvac.Client:
        token = mint(ident, key_pem=self.key, issuer="airflow-finetune-gov", audience="openbao",
                     purpose=purpose, extra=extra or None, ttl_seconds=300)
        client = hvac.Client(url=self.addr, timeout=10)
        client.auth.jwt.jwt_login(role=role, jwt=token, path=self.jwt_mount)
        return client

    def leftover_roles(self) -> tuple[str, list[str]]:
        """Dynamic roles matching the patterns, queried as superuser (else as the monitor role)."""
        where = " OR ".join("rolname LIKE %s" for _ in ROLE_PATTERNS)
        sql = f"SELECT rolname FROM pg_roles WHERE {where} ORDER BY rolname"
        if self.superuser_dsn is not None:
            who, conn = "superuser postgres", psycopg.connect(self.superuser_dsn, autocommit=True)
        else:  # an external server: its superuser URL is not kept in the state
            url = self.monitor_url.replace("postgresql+psycopg://", "postgresql://")
            who, conn = "monitor role (no superuser password in the state)", psycopg.connect(url, autocommit=True)
        with conn:
            return who, [str(r[0]) for r in conn.execute(sql, ROLE_PATTERNS).fetchall()]


def request_label(method: str, url: str) -> str:
    path = url.split("/v1/", 1)[-1]
    for prefix, label in (("sys/leases/renew/", "renew"), ("auth/token/lookup-self", "token lookup-self"),
                          ("sys/wrapping/wrap", "wrap"), ("sys/leases/revoke", "lease revoke"),
                          ("auth/token/revoke-accessor", "token revoke-accessor")):
        if path.startswith(prefix):
            return label
    if "/creds/" in path:
        return "generate_credentials"
    if "/metadata/" in path:
        return "hand-over metadata delete"
    return f"{method.upper()} {path}"


class RequestTimer:
    """Times every OpenBao request of the clients it is attached to (instance-level wrapper, ~1 us)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def attach(self, client: hvac.Client) -> hvac.Client:
        adapter = client.adapter
        inner: Callable[..., Any] = adapter.request

        def timed(method: str, url: str, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return inner(method, url, *args, **kwargs)
            finally:
                self.calls.append((request_label(method, url), (time.perf_counter() - t) * 1000))

        adapter.request = timed  # type: ignore[method-assign]
        return client

    def take(self) -> list[tuple[str, float]]:
        calls, self.calls = self.calls, []
        return calls


@dataclass
class Samples:
    governed: list[float] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    login: list[float] = field(default_factory=list)
    revoker_login: list[float] = field(default_factory=list)
    issue: list[float] = field(default_factory=list)
    revoke_verify: list[float] = field(default_factory=list)
    # per measured iteration: phase -> step -> ms (OpenBao requests, and the rest of the phase)
    steps: dict[str, list[dict[str, float]]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # phase -> per iteration
    created_roles: set[str] = field(default_factory=set)
    outstanding: set[str] = field(default_factory=set)  # lease ids issued and not yet revoked


class Bench:
    def __init__(self, env: Env) -> None:
        self.env = env
        self.s = Samples()
        self._revoker: hvac.Client | None = None
        self._revoker_at = 0.0
        self.timer = RequestTimer()
        self.timer.attach(env.root)

    def revoker(self) -> hvac.Client:
        if self._revoker is None or time.monotonic() - self._revoker_at > REVOKER_RELOGIN_SECONDS:
            ident = TaskIdentity("bench_lease", f"bench__{uuid.uuid4().hex}", "revoke_lease", 1)
            t = time.perf_counter()
            self._revoker = self.timer.attach(self.env.login("revoker", ident, "revoke"))
            self.s.revoker_login.append((time.perf_counter() - t) * 1000)
            self._revoker_at = time.monotonic()
        return self._revoker

    def governed(self, record: bool) -> None:
        env = self.env
        revoker = self.revoker()
        who = TaskIdentity("bench_lease", f"bench__{uuid.uuid4().hex}", "acquire_lease", 1)
        t = time.perf_counter()
        client = env.login(f"lease-{DATASET}", who, "lease", dataset=DATASET, approval_id="bench")
        login_ms = (time.perf_counter() - t) * 1000
        self.timer.attach(client)
        self.timer.take()
        lease_broker = broker.LeaseBroker(client, env.db_mount, env.handover_mount)

        t0 = time.perf_counter()
        issued = lease_broker.issue(DB_ROLE, ttl_seconds=LEASE_TTL, wrap_ttl_seconds=LEASE_TTL)
        t1 = time.perf_counter()
        issue_calls = self.timer.take()
        self.s.outstanding.add(issued.lease_id)
        self.s.created_roles.add(issued.db_role)
        state = lifecycle.LeaseState(lease_id=issued.lease_id, dag_id=who.dag_id, run_id=who.run_id,
                                     dataset=DATASET, db_role=issued.db_role, token_accessor=issued.token_accessor,
                                     issued_at="", expires_at=None)
        verified = lifecycle.revoke_and_verify(revoker, state, monitor_url=env.monitor_url,
                                               handover_mount=env.handover_mount, record=lambda *a: None,
                                               reason="bench")
        t2 = time.perf_counter()
        revoke_calls = self.timer.take()
        if not verified:
            raise RuntimeError(f"governed revocation of {issued.lease_id} ({issued.db_role}) was not verified")
        self.s.outstanding.discard(issued.lease_id)
        if record:
            self.s.login.append(login_ms)
            self.s.issue.append((t1 - t0) * 1000)
            self.s.revoke_verify.append((t2 - t1) * 1000)
            self.s.governed.append((t2 - t0) * 1000)
            self._steps("governed issue", issue_calls, (t1 - t0) * 1000, "rest (client side)")
            self._steps("governed revoke_and_verify", revoke_calls, (t2 - t1) * 1000,
                        "rest: verify on PostgreSQL (+ client side)")

    def raw(self, record: bool) -> None:
        root = self.env.root
        self.timer.take()
        t0 = time.perf_counter()
        resp = root.secrets.database.generate_credentials(DB_ROLE, mount_point=self.env.db_mount)
        lease_id = resp["lease_id"]
        self.s.outstanding.add(lease_id)
        self.s.created_roles.add(resp["data"]["username"])
        root.sys.revoke_lease(lease_id)
        t1 = time.perf_counter()
        calls = self.timer.take()
        self.s.outstanding.discard(lease_id)
        if record:
            self.s.raw.append((t1 - t0) * 1000)
            self._steps("raw", calls, (t1 - t0) * 1000, "rest (client side)")

    def _steps(self, phase: str, calls: list[tuple[str, float]], total_ms: float, rest: str) -> None:
        steps: dict[str, float] = {}
        for label, ms in calls:
            steps[label] = steps.get(label, 0.0) + ms
        steps[rest] = total_ms - sum(ms for _, ms in calls)
        self.s.steps[phase].append(steps)
        self.s.requests[phase].append(len(calls))

    def cleanup(self) -> None:
        """Best effort after a failure: revoke whatever the bench issued and did not revoke."""
        for lease_id in list(self.s.outstanding):
            try:
                broker.revoke(self.env.root, lease_id, attempts=2, base_delay=0.2)
                self.s.outstanding.discard(lease_id)
            except broker.LeaseError as exc:
                print(f"cleanup: {exc}", file=sys.stderr)


def run(env: Env, iterations: int, warmup: int) -> Samples:
    bench = Bench(env)
    try:
        for _ in range(warmup):
            bench.governed(record=False)
            bench.raw(record=False)
        for _ in range(iterations):
            bench.governed(record=True)
            bench.raw(record=True)
    finally:
        bench.cleanup()
    return bench.s


def report(env: Env, s: Samples, *, iterations: int, warmup: int, where: str) -> None:
    def row(name: str, values: list[float]) -> str:
        return f"{name:<52} {len(values):>4} {statistics.median(values):>9.1f} {pct(values, 0.95):>9.1f}"

    g50, r50 = statistics.median(s.governed), statistics.median(s.raw)
    ratio = g50 / r50
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"hvac {importlib.metadata.version('hvac')}; stack: {where}")
    print(f"OpenBao {env.addr}, database mount {env.db_mount}, role {DB_ROLE}; {warmup} warm-up + {iterations} "
          "measured iterations each, interleaved governed/raw; time.perf_counter")
    print()
    print(f"{'operation':<52} {'n':>4} {'p50 ms':>9} {'p95 ms':>9}")
    print(row("governed: issue + revoke_and_verify", s.governed))
    print(row("  of which LeaseBroker.issue", s.issue))
    print(row("  of which lifecycle.revoke_and_verify", s.revoke_verify))
    print(row("raw hvac (root): generate_credentials + revoke_lease", s.raw))
    print(row("JWT login lease-benign (mint + jwt_login), untimed*", s.login))
    print(row("JWT login revoker (mint + jwt_login), untimed*", s.revoker_login))
    print("* logins are not part of the measured cycle: a fresh lease client logs in before each governed")
    print("  iteration (revoke_and_verify revokes its token); the revoker logs in once (again every "
          f"{REVOKER_RELOGIN_SECONDS:.0f} s),")
    print("  first of all, so its figure includes the one-off lazy import of PyJWT/cryptography in mint().")
    print()
    print(f"ratio governed p50 / raw p50 = {g50:.1f} / {r50:.1f} = {ratio:.2f}")
    print(f"goal ratio <= {RATIO_GOAL}: {'PASS' if ratio <= RATIO_GOAL else 'MISS'}")
    print(f"goal governed p50 <= {P50_GOAL_MS:.0f} ms: {'PASS' if g50 <= P50_GOAL_MS else 'MISS'}")
    result("lease cycle p50: governed issue+revoke+verify vs raw hvac", baseline=r50, ours=g50, unit="ms",
           goal=f"ratio <= {RATIO_GOAL}", met=ratio <= RATIO_GOAL, tag="P1")
    result("lease cycle p50, governed", baseline=None, ours=g50, unit="ms", goal=f"<= {P50_GOAL_MS:.0f} ms",
           met=g50 <= P50_GOAL_MS, tag="P1")
    print()
    print("where the time goes (p50 of each step over the measured iterations; steps do not sum to the p50):")
    print(f"{'phase / step':<52} {'OpenBao requests':>16} {'p50 ms':>9}")
    for phase, per_iter in s.steps.items():
        counts = sorted(set(s.requests[phase]))
        print(f"{phase:<52} {'/'.join(map(str, counts)):>16} "
              f"{statistics.median(sum(it.values()) for it in per_iter):>9.1f}")
        for label in dict.fromkeys(label for it in per_iter for label in it):
            values = [it.get(label, 0.0) for it in per_iter]
            print(f"  {label:<50} {'':>16} {statistics.median(values):>9.1f}")
    print()
    print("extra work on the governed path (raw does 1 OpenBao request to issue and 1 to revoke):")
    print("  issue:  generate_credentials, + renew (PUT sys/leases/renew, sets the TTL to the requested "
          f"{LEASE_TTL} s),")
    print("          + token lookup-self (the accessor of the token that owns the lease),")
    print("          + response-wrap {username, password} (POST sys/wrapping/wrap) = 4 requests;")
    print("          all under a JWT token whose policies are templated on identity metadata")
    print("  revoke: sync lease revoke, + token revoke by accessor (the lease client's token),")
    print("          + delete of the run's KV hand-over metadata = 3 requests,")
    print("          + verify on PostgreSQL: one query on a pooled connection as the monitor role,")
    print("          counting pg_roles and pg_stat_activity for the leased role (polled until both are 0)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30, help="measured iterations of each operation")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured iterations of each operation first")
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="use the running stack in this state directory (left running) instead of a fresh one")
    args = parser.parse_args()
    if args.iterations < 1 or args.warmup < 0:
        parser.error("--iterations must be >= 1 and --warmup >= 0")

    work: Path | None = None
    stack: Stack | None = None
    try:
        if args.state_dir is not None:
            existing = Stack(args.state_dir)
            state = existing.load()
            if state is None or not existing.status()["running"]:
                print(f"no running stack in {existing.dir}: start one with `fgov stack up` or omit --state-dir",
                      file=sys.stderr)
                return 2
            where = f"running stack in {existing.dir} (left running)"
        else:
            work = Path(tempfile.mkdtemp(prefix="fgov-bench-"))
            work.chmod(0o755)
            dags = work / "dags"
            dags.mkdir()  # empty: nothing but the lease cycle runs against the stack
            stack = Stack(work / "state")
            t = time.monotonic()
            state = stack.up(StackOptions(state_dir=stack.dir, dags_folder=dags, log=lambda *_: None))
            where = f"fresh embedded stack, up in {time.monotonic() - t:.1f} s (stopped afterwards)"
        env = Env(state)
        samples = run(env, args.iterations, args.warmup)
        report(env, samples, iterations=args.iterations, warmup=args.warmup, where=where)
        who, present = env.leftover_roles()
        left = sorted(set(present) & samples.created_roles)
        print()
        print(f"leftover check (as {who}): {len(samples.created_roles)} dynamic roles created by the bench, "
              f"{len(left)} left in pg_roles; {len(present)} roles matching "
              f"{' / '.join(p.replace('%', '*') for p in ROLE_PATTERNS)} in total: {'OK' if not left else 'FAIL'}")
        assert not left, f"roles created by the bench are still in pg_roles: {left}"
    finally:
        if stack is not None:
            records = stack.records()
            stack.down(log=lambda *_: None)
            alive = [f"{r.name} (pid {r.pid})" for r in records if r.alive()]
            print(f"stack stopped: {len(records)} recorded processes, "
                  f"{'none left running' if not alive else 'STILL RUNNING: ' + ', '.join(alive)}")
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

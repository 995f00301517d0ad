"""Benchmark: what the control plane costs, on the embedded real stack.

1. The lease cycle as a task does it with a control plane (``[finetune_gov] control_plane_socket``): log in
   through the control plane (it mints the workload JWT and logs in to OpenBao after checking the run's
   approval in lineage), issue with that token (``LeaseBroker.issue``), record ``lease.issued`` through the
   control plane, and have the control plane revoke, prove the role gone on PostgreSQL and record it
   (``/v1/leases/revoke``). Versus raw hvac with the root token (``generate_credentials`` + ``revoke_lease``),
   interleaved in the same process. Goal from issue 16: ratio <= 1.5.
2. Lineage appends through the control plane by 20 concurrent writer processes (children of the registered
   task process, each with its own connection to the socket) vs 20 processes doing plain single-row INSERTs
   into a table of the same shape (no chain, no lock), measured in the same run. Goal: ratio >= 1.0.
3. The round trip of one call (``/v1/whoami``).

The bench registers its own process with the control plane as a task of a synthetic run and writes that
run's run start, decision, witnessed answer and grant directly into lineage, as the deployment's user: the
preconditions a real run gets from the scheduler, the control plane and the api-server.

    .venv/bin/python bench/control_plane.py [--iterations N] [--appends N] [--state-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import hvac  # noqa: E402
import psycopg  # noqa: E402

from airflow_finetune_gov.approval.verify import answered, request_sha256, seal_decision  # noqa: E402
from airflow_finetune_gov.control.client import ControlPlaneClient  # noqa: E402
from airflow_finetune_gov.credentials import broker  # noqa: E402
from airflow_finetune_gov.lineage import events  # noqa: E402
from airflow_finetune_gov.lineage.runs import RUN_STARTED, SCHEDULER_TASK_ID  # noqa: E402
from airflow_finetune_gov.lineage.store import EventKey, LineageStore  # noqa: E402
from airflow_finetune_gov.policy.engine import ChangeRequest, load_policy  # noqa: E402
from airflow_finetune_gov.stack.manager import Stack, StackOptions  # noqa: E402
from bench.common import pct, result  # noqa: E402

DAG_ID, DATASET, DB_ROLE, TTL = "bench_control_plane", "benign", "ds-benign", 300
RATIO_GOAL, APPEND_GOAL, WRITERS = 1.5, 1.0, 20


def prepare(state: dict[str, Any], store: LineageStore, plane: ControlPlaneClient) -> tuple[str, dict[str, Any]]:
    """A synthetic approved run, and this process registered as its lease task."""
    run_id = f"bench__{uuid.uuid4().hex}"
    now = datetime.now(UTC).isoformat()
    events.record(store, EventKey(DAG_ID, run_id, SCHEDULER_TASK_ID, 0), RUN_STARTED, actor="scheduler",
                  payload={"dag_run_id": int(time.time()), "start_date": now})
    d = load_policy().decide(ChangeRequest("tiny-gpt", DATASET, "staging", "requester")).to_dict()
    decision = seal_decision({**d, "dataset": None, "hyperparameters": None})
    events.record(store, EventKey(DAG_ID, run_id, "policy_check", 1), "policy.decided", actor="policy",
                  payload=decision)
    shown = request_sha256("Approve the bench's fine-tune", "", ["Approve", "Reject"])
    events.record(store, EventKey(DAG_ID, run_id, "approval_gate", 1), "approval.requested", actor="policy",
                  payload={"tier": decision["tier"], "needed": 1, "round": 1,
                           "policy_sha256": decision["policy_sha256"], **answered(decision), "request_sha256": shown})
    events.record(store, EventKey(DAG_ID, run_id, "approval_gate", 0), "approval.witnessed", actor="api-server",
                  payload={"responder": "approver1", "chosen_options": ["Approve"], "responded_at": now,
                           "request_sha256": shown})
    grant = {"approval_id": "bench", "responder": "approver1", "option": "Approve", "tier": decision["tier"],
             "policy_sha256": decision["policy_sha256"], **answered(decision)}
    events.record(store, EventKey(DAG_ID, run_id, "approval_gate", 1), "approval.granted", actor="approver1",
                  payload=grant)
    plane.register(os.getpid(), {"dag_id": DAG_ID, "run_id": run_id, "task_id": "acquire_lease", "try_number": 1})
    return run_id, grant


def plane_cycle(plane: ControlPlaneClient, addr: str, db_mount: str, handover: str) -> tuple[float, dict[str, float]]:
    steps: dict[str, float] = {}
    t0 = time.perf_counter()
    token = plane.login(f"lease-{DATASET}", "lease", {"dataset": DATASET, "approval_id": "bench"})
    t1 = time.perf_counter()
    issued = broker.LeaseBroker(hvac.Client(url=addr, token=token, timeout=10), db_mount, handover).issue(
        DB_ROLE, ttl_seconds=TTL, wrap_ttl_seconds=TTL)
    t2 = time.perf_counter()
    plane.call("/v1/lineage/append", {"event_type": "lease.issued", "actor": "lease-broker", "payload": {
        **issued.public(), "purpose": "training", "dataset": DATASET,
        "expires_at": (datetime.now(UTC) + timedelta(seconds=issued.lease_duration)).isoformat()}})
    t3 = time.perf_counter()
    done = plane.revoke(reason="bench", purposes=("training",), lease_ids={issued.lease_id}, fallback=None)
    t4 = time.perf_counter()
    if not (done and all(r["verified"] for r in done)):
        raise RuntimeError(f"the control plane did not verify the revocation of {issued.lease_id}: {done}")
    steps = {"login through the control plane": t1 - t0, "issue (in the task)": t2 - t1,
             "record lease.issued": t3 - t2, "revoke + verify + record (control plane)": t4 - t3}
    return (t4 - t0) * 1000, {k: v * 1000 for k, v in steps.items()}


def raw_cycle(root: hvac.Client, db_mount: str) -> float:
    t0 = time.perf_counter()
    lease = root.secrets.database.generate_credentials(DB_ROLE, mount_point=db_mount)["lease_id"]
    root.sys.revoke_lease(lease)
    return (time.perf_counter() - t0) * 1000


def _writer(work: Any, n: int, go: Any, failed: Any) -> None:
    go.wait()
    try:
        for i in range(n):
            work(i)
    except BaseException:
        failed.set()
        raise


def appends(n: int, work: Any) -> float:
    """Events/s when WRITERS processes (forked from this one: for the control plane, descendants of the
    registered task process, as a task's own children are) each run ``work(i)`` n times, started together."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    go, failed = ctx.Barrier(WRITERS + 1), ctx.Event()
    procs = [ctx.Process(target=_writer, args=(work, n, go, failed)) for _ in range(WRITERS)]
    for p in procs:
        p.start()
    go.wait()
    t0 = time.perf_counter()
    for p in procs:
        p.join()
    elapsed = time.perf_counter() - t0
    if failed.is_set() or any(p.exitcode for p in procs):
        raise RuntimeError("a writer failed (its traceback is above)")
    return WRITERS * n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--appends", type=int, default=50, help="appends per writer (20 writers)")
    parser.add_argument("--state-dir", type=Path, default=None, help="a running stack (left running)")
    args = parser.parse_args()
    work = stack = None
    if args.state_dir is not None:
        stack = Stack(args.state_dir)
        where = f"running stack {args.state_dir}"
    else:
        work = Path(tempfile.mkdtemp(prefix="fgov-bench-cp-"))
        work.chmod(0o755)
        (work / "dags").mkdir()
        stack = Stack(work / "state")
        stack.up(StackOptions(state_dir=work / "state", dags_folder=work / "dags", log=lambda *_: None))
        where = "fresh embedded stack"
    try:
        state = stack.load()
        assert state is not None
        plane = ControlPlaneClient(state["control_plane"]["socket"], timeout=60)
        store = LineageStore(Path(state["governance_db_url_file"]).read_text())
        addr = state["openbao"]["addr"]
        db_mount = state["openbao"].get("database_mount", "fgov-database")
        root = hvac.Client(url=addr, token=Path(state["openbao"]["root_token_file"]).read_text(), timeout=10)
        _, grant = prepare(state, store, plane)
        plane_ms: list[float] = []
        raw_ms: list[float] = []
        per_step: dict[str, list[float]] = {}
        for i in range(args.warmup + args.iterations):
            total, steps = plane_cycle(plane, addr, db_mount, "fgov-handover")
            raw = raw_cycle(root, db_mount)
            if i >= args.warmup:
                plane_ms.append(total)
                raw_ms.append(raw)
                for k, v in steps.items():
                    per_step.setdefault(k, []).append(v)
        rtt = []
        for _ in range(200):
            t = time.perf_counter()
            plane.whoami()
            rtt.append((time.perf_counter() - t) * 1000)

        pg = state["postgres"]
        owner = psycopg.connect(host=pg.get("host", "127.0.0.1"), port=pg["port"], user="postgres",
                                password=Path(pg["superuser_password_file"]).read_text(), dbname="fgov_governance",
                                autocommit=True)
        owner.execute("CREATE TABLE IF NOT EXISTS bench_cp_plain (id bigserial PRIMARY KEY, dag_id text, run_id text, "
                      "task_id text, event_type text, actor text, created_at text, payload text)")
        local: dict[int, Any] = {}

        def plain(i: int) -> None:
            conn = local.get(os.getpid())
            if conn is None:
                conn = local[os.getpid()] = psycopg.connect(
                    host=pg.get("host", "127.0.0.1"), port=pg["port"], user="postgres",
                    password=Path(pg["superuser_password_file"]).read_text(), dbname="fgov_governance",
                    autocommit=True)
            conn.execute("INSERT INTO bench_cp_plain (dag_id, run_id, task_id, event_type, actor, created_at, payload) "
                         "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                         (DAG_ID, "r", "acquire_lease", "approval.duplicate", "bench", datetime.now(UTC).isoformat(),
                          f'{{"n": {i}}}'))

        dup = {**grant, "comment": "", "responded_at": None, "approved_by": ["approver1"]}
        dup = {k: dup[k] for k in ("responder", "option", "comment", "responded_at", "decision_id", "decision_sha256",
                                   "approved_by")}

        def through_plane(i: int) -> None:
            plane.call("/v1/lineage/append", {"event_type": "approval.duplicate", "actor": "bench", "payload": dup})

        plain_rate = statistics.median(appends(args.appends, plain) for _ in range(3))
        plane_rate = statistics.median(appends(args.appends, through_plane) for _ in range(3))
        owner.execute("DROP TABLE bench_cp_plain")
        plane.deregister(os.getpid())
    finally:
        if work is not None:
            stack.down(log=lambda *_: None)
            shutil.rmtree(work, ignore_errors=True)

    p50, r50 = statistics.median(plane_ms), statistics.median(raw_ms)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; {where}")
    print(f"{args.warmup} warm-up + {args.iterations} measured lease cycles each, interleaved")
    print(f"{'operation':<58} {'p50 ms':>8} {'p95 ms':>8}")
    cycle = "lease cycle through the control plane (login..revoke+verify)"
    print(f"{cycle:<58} {p50:>8.1f} {pct(plane_ms, .95):>8.1f}")
    for k, v in per_step.items():
        print(f"  {k:<56} {statistics.median(v):>8.1f}")
    print(f"{'raw hvac (root): generate_credentials + revoke_lease':<58} {r50:>8.1f} {pct(raw_ms, .95):>8.1f}")
    call = "one control-plane call (/v1/whoami), 200 calls"
    print(f"{call:<58} {statistics.median(rtt):>8.2f} {pct(rtt, .95):>8.2f}")
    ratio = p50 / r50
    verdict = "PASS" if ratio <= RATIO_GOAL else "MISS"
    print(f"ratio {p50:.1f} / {r50:.1f} = {ratio:.2f} (goal <= {RATIO_GOAL}: {verdict})")
    a_ratio = plane_rate / plain_rate
    print(f"lineage append, {WRITERS} writers x {args.appends}: through the control plane {plane_rate:.0f} events/s, "
          f"plain single-row INSERT {plain_rate:.0f}/s, ratio {a_ratio:.2f} "
          f"(goal >= {APPEND_GOAL}: {'PASS' if a_ratio >= APPEND_GOAL else 'MISS'})")
    result("lease cycle p50 through the control plane vs raw hvac", baseline=r50, ours=p50, unit="ms",
           goal=f"ratio <= {RATIO_GOAL}", met=ratio <= RATIO_GOAL, tag="P1")
    result(f"lineage append, {WRITERS} writers: control plane vs plain INSERT", baseline=plain_rate, ours=plane_rate,
           unit="events/s", goal=f"ratio >= {APPEND_GOAL}", met=a_ratio >= APPEND_GOAL, tag="P3")
    return 0


if __name__ == "__main__":
    sys.exit(main())

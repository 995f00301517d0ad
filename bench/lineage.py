"""Benchmark: the lineage store on a real PostgreSQL: append rate, and what `fgov lineage show` and
`fgov runs list` cost with a million events in the store.

Starts a standalone embedded PostgreSQL (the stack's binaries and settings: fsync on, synchronous
commit) in a temporary directory with the stack's roles: ``fgov_owner`` migrates the schema,
``fgov_lineage`` (INSERT and SELECT only) writes and reads over TCP with scram-sha-256, like tasks do.

1. Append rate, one transaction per event (each must be durable before the governed step goes on):
   ``LineageStore.record`` vs the baseline measured in the same run, a plain INSERT of the same rows
   (no lock, no chain) through the same kind of engine into a table of the same shape. First with the
   schema at revision 0001 (the client-side path: lock, tails, INSERT, COMMIT), then after
   ``fgov db upgrade`` to 0002 (one call of ``fgov_lineage_append`` in autocommit), where the
   client-side path is measured again. Interleaved blocks of 250; one writer, then ``--writers``
   processes at once (Airflow runs tasks in parallel). Goal >= 2,000 events/s.
2. Fill to ``--events`` (1,000,000) with COPY: valid chained events (the chain continues from the
   recorded ones; ``fgov audit verify`` passes over all of them, and is timed) shaped like the demo's
   runs (24 events each, 8 runs interleaved at a time, payloads like the real ones).
3. p95 of ``fgov lineage show RUN_ID`` and ``fgov runs list`` called through the CLI's ``main`` in
   this process (a new store and connection per call, as the command does; output discarded) on
   random runs, and of the store calls alone on a warm connection. The GROUP BY over the whole table
   that ``runs list`` ran before it took ``--limit`` is the baseline. Goal p95 <= 50 ms.

    .venv/bin/python bench/lineage.py [--events N] [--append N] [--queries N] [--writers N] [--no-verify]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import random
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psycopg  # noqa: E402
from sqlalchemy import MetaData, create_engine, func, insert, select, text  # noqa: E402

from airflow_finetune_gov.cli.main import main as fgov  # noqa: E402
from airflow_finetune_gov.lineage.store import (  # noqa: E402
    TABLE,
    Base,
    EventKey,
    LineageEvent,
    LineageStore,
    canonical,
    create_schema,
    event_hash,
    head_revision,
    upgrade_schema,
)
from airflow_finetune_gov.stack import postgres  # noqa: E402
from airflow_finetune_gov.stack.procs import pick_free_port  # noqa: E402
from bench.common import pct  # noqa: E402
from bench.common import result as table_row  # noqa: E402

APPEND_GOAL = 2000.0
QUERY_GOAL_MS = 50.0
BLOCK = 250
DAGS = ("governed_finetune_demo", "governed_example_command", "governed_example_mapped", "governed_rollback")
COLUMNS = ("dag_id", "run_id", "task_id", "try_number", "map_index", "event_type", "actor", "created_at",
           "payload", "prev_run_hash", "prev_hash", "hash")


def _h() -> str:
    return secrets.token_hex(32)


def run_template() -> list[tuple[str, str, str, dict[str, Any]]]:
    """One governed run's events (task, type, actor, payload), shaped like the demo's lineage."""
    lease = lambda purpose: {"lease_id": f"fgov-database/creds/ds-benign/{secrets.token_urlsafe(18)}",  # noqa: E731
                             "db_role": f"v-fgov-jwt-{purpose}-{secrets.token_hex(10)}", "purpose": purpose,
                             "dataset": "benign", "lease_duration": 900, "token_accessor": secrets.token_hex(12)}
    catalog, train, infer = lease("catalog"), lease("training"), lease("inference")
    content, base, out = _h(), _h(), _h()
    hp = {"epochs": 10, "learning_rate": 0.01, "batch_size": 8, "lora_r": 8, "lora_alpha": 16, "seed": 0}
    metric = {"base_rate": 0.975, "tuned_rate": 0.969, "diff": -0.006, "ci95": [-0.02, 0.008], "n": 480,
              "verdict": "pass", "margin": 0.05, "flipped": 3}
    return [
        ("policy_check", "lease.requested", "lease-broker", {"purpose": "catalog", "ttl_seconds": 300}),
        ("policy_check", "lease.issued", "lease-broker", catalog),
        ("policy_check", "lease.revoked", "lease-broker", {**catalog, "reason": "catalog lease done"}),
        ("policy_check", "lease.verified", "lease-broker", {"db_role": catalog["db_role"], "sessions": 0}),
        ("policy_check", "policy.decided", "policy", {
            "tier": "single", "reasons": ["staging: one approver"], "approvers": ["approver1", "approver2"],
            "quorum": 1, "policy_sha256": _h(), "dataset": {"name": "benign", "rows": 48, "content_sha256": content,
                                                             "uri": "postgresql://db/fgov_datasets#datasets.benign"},
            "hyperparameters": hp, "target_environment": "staging", "model": "fgov-demo-tiny"}),
        ("approval_gate", "approval.requested", "requester", {"tier": "single", "assigned_users": ["approver1"]}),
        ("approval_gate", "approval.granted", "approver1", {"option": "Approve", "responder": "approver1",
                                                            "tier": "single", "comment": "ok"}),
        ("approval_gate", "approval.decided", "policy", {"outcome": "approved", "tier": "single",
                                                         "approvers": ["approver1"]}),
        ("acquire_lease", "lease.requested", "lease-broker", {"purpose": "training", "ttl_seconds": 900}),
        ("acquire_lease", "lease.issued", "lease-broker", train),
        ("tune", "tuning.started", "tune", {"backend": "local_peft", "base_model": "fgov-demo-tiny",
                                            "base_sha256": base, "rows": 48, "content_sha256": content}),
        ("tune", "lease.renewed", "tune", {"lease_id": train["lease_id"], "ttl_seconds": 900}),
        ("tune", "tuning.completed", "tune", {
            "backend": "local_peft", "rows": 48, "content_sha256": content, "base_sha256": base, "version": out[:12],
            "output_sha256": out, "hyperparameters": hp, "metrics": {"loss": 0.27, "steps_per_s": 181.0},
            "duration_s": 0.44}),
        ("revoke_lease", "lease.revoked", "lease-broker", {**train, "reason": "teardown"}),
        ("revoke_lease", "lease.verified", "lease-broker", {"db_role": train["db_role"], "sessions": 0}),
        ("evaluate", "lease.requested", "lease-broker", {"purpose": "inference", "ttl_seconds": 300}),
        ("evaluate", "lease.issued", "lease-broker", infer),
        ("evaluate", "lease.revoked", "lease-broker", {**infer, "reason": "suites read"}),
        ("evaluate", "lease.verified", "lease-broker", {"db_role": infer["db_role"], "sessions": 0}),
        ("evaluate", "evaluation.started", "evaluate", {"suites": {n: _h() for n in (
            "harmful", "benign_edgy", "jailbreak", "task_quality")}, "prompts": 1112}),
        ("evaluate", "evaluation.completed", "evaluate", {
            "verdict": "pass", "metrics": {m: metric for m in ("harmful_refusal", "jailbreak_refusal",
                                                               "benign_compliance", "task_quality")},
            "report": f"_reports/x/{out[:12]}/report.json", "report_sha256": _h()}),
        ("promote", "provenance.signed", "promote", {"version": out[:12], "envelope_sha256": _h(), "key": "v1"}),
        ("promote", "provenance.verified", "promote", {"version": out[:12], "files": 3}),
        ("promote", "promotion.completed", "promote", {"alias": "staging", "version": out[:12],
                                                       "previous": _h()[:12], "verdict": "pass"}),
    ]


def chained_rows(n: int, prev: str | None, seed: int) -> Iterator[tuple[Any, ...]]:
    """``n`` valid chained events continuing the global chain after ``prev``; 8 runs interleaved."""
    rng = random.Random(seed)
    clock = datetime(2026, 1, 1, tzinfo=UTC)
    active: list[tuple[str, str, list[tuple[str, str, str, dict[str, Any]]], list[str | None]]] = []
    made = 0
    serial = 0
    while made < n:
        while len(active) < 8:
            serial += 1
            run_id = f"manual__{(clock + timedelta(seconds=serial)).isoformat()}-{serial:07d}"
            active.append((DAGS[serial % len(DAGS)], run_id, run_template(), [None]))
        i = rng.randrange(len(active))
        dag_id, run_id, events, run_prev = active[i]
        task_id, event_type, actor, payload = events.pop(0)
        clock += timedelta(milliseconds=rng.randrange(1, 400))
        row = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "try_number": 1, "map_index": -1,
               "event_type": event_type, "actor": actor, "created_at": clock.isoformat(timespec="microseconds"),
               "payload": canonical(payload), "prev_run_hash": run_prev[0], "prev_hash": prev}
        row["hash"] = prev = run_prev[0] = event_hash(row)
        yield tuple(row[c] for c in COLUMNS)
        made += 1
        if not events:
            active.pop(i)


class Server:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fgov-bench-lineage-"))
        self.root.chmod(0o755)
        self.port = pick_free_port(set())
        self.password = secrets.token_urlsafe(16)
        postgres.initdb(self.root / "pg", self.password)
        self.record = postgres.start(self.root / "pg", self.port, self.root / "pg.log")
        self.owner_pw, self.writer_pw = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
        with psycopg.connect(self.conninfo("postgres", self.password, "postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE fgov_owner LOGIN PASSWORD '{self.owner_pw}'")
            conn.execute(f"CREATE ROLE fgov_lineage LOGIN PASSWORD '{self.writer_pw}'")
            conn.execute("CREATE DATABASE fgov_governance OWNER fgov_owner")
        with psycopg.connect(self.conninfo("fgov_owner", self.owner_pw), autocommit=True) as conn:
            conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
            conn.execute("GRANT USAGE ON SCHEMA public TO fgov_lineage")

    def conninfo(self, user: str, password: str, db: str = "fgov_governance") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={db} user={user} password={password}"

    def url(self, user: str, password: str) -> str:
        return f"postgresql+psycopg://{user}:{password}@127.0.0.1:{self.port}/fgov_governance"

    def stop(self) -> None:
        postgres.shutdown(self.record)
        shutil.rmtree(self.root, ignore_errors=True)


def plain_table(server: Server) -> Any:
    """A table of the lineage table's shape (same columns, indexes and constraints), no chain."""
    meta = MetaData()
    table = Base.metadata.tables[TABLE].to_metadata(meta, name="bench_plain_event")
    engine = create_engine(server.url("fgov_owner", server.owner_pw))
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(text("GRANT SELECT, INSERT ON bench_plain_event TO fgov_lineage"))
        conn.execute(text("GRANT USAGE ON SEQUENCE bench_plain_event_id_seq TO fgov_lineage"))
    engine.dispose()
    return table


MODES = {"record": "record", "client": "record, client-side path", "plain": "plain INSERT"}


def append(store: LineageStore, stmt: Any, mode: str, jobs: list[tuple[tuple[str, str], Any]]) -> None:
    """Append ``jobs``, one transaction each. ``record``: ``LineageStore.record`` as it runs (on the server
    at revision 0002); ``client``: ``record`` made to take the client-side path (as at revision 0001);
    ``plain``: an INSERT of the same row, no lock, no chain."""
    if mode == "client":
        store._server_append = False
    for (dag_id, run_id), (task_id, event_type, actor, payload) in jobs:
        if mode != "plain":
            store.record(EventKey(dag_id, run_id, task_id, 1), event_type, actor=actor, payload=payload)
            continue
        row = {"dag_id": dag_id, "run_id": run_id, "task_id": task_id, "try_number": 1, "map_index": -1,
               "event_type": event_type, "actor": actor,
               "created_at": datetime.now(UTC).isoformat(timespec="microseconds"),
               "payload": canonical(dict(payload)), "prev_run_hash": None, "prev_hash": None}
        row["hash"] = event_hash(row)
        with store.engine.begin() as conn:
            conn.execute(stmt, row)


def make_jobs(n: int, tag: str) -> list[tuple[tuple[str, str], Any]]:
    runs = [(DAGS[i % len(DAGS)], f"bench_{tag}_{i}_{secrets.token_hex(4)}") for i in range(max(1, n // 24))]
    template = run_template()
    return [(runs[k % len(runs)], template[k % len(template)]) for k in range(n)]


def bench_append(url: str, table: Any, n: int, tag: str, modes: tuple[str, ...]) -> dict[str, float]:
    """One writer, interleaved blocks of each mode (a store per mode, warmed up first); events/s."""
    stores = {mode: LineageStore(url) for mode in modes}
    stmt = insert(table)  # built once, as record's statements are
    for mode, store in stores.items():
        append(store, stmt, mode, make_jobs(BLOCK // 5, f"warm{tag}"))
    jobs = make_jobs(n, tag)
    spent = dict.fromkeys(modes, 0.0)
    for i in range(0, n, BLOCK):
        for mode in modes:
            t = time.perf_counter()
            append(stores[mode], stmt, mode, jobs[i:i + BLOCK])
            spent[mode] += time.perf_counter() - t
    for store in stores.values():
        store.engine.dispose()
    return {mode: n / secs for mode, secs in spent.items()}


def _writer(url: str, table: Any, mode: str, n: int, go: Any, done: Any) -> None:
    store = LineageStore(url)
    stmt = insert(table)
    append(store, stmt, mode, make_jobs(BLOCK // 10, f"w{mode}"))  # connect and warm up before the start
    jobs = make_jobs(n, f"c{mode}")
    go.wait()
    append(store, stmt, mode, jobs)
    done.put(time.perf_counter())
    store.engine.dispose()


def bench_concurrent(url: str, table: Any, writers: int, n: int, modes: tuple[str, ...]) -> dict[str, float]:
    """``writers`` processes (as Airflow's task processes are) appending at once, each mode in turn,
    twice; events/s over the wall time of a round, the better round per mode."""
    ctx = multiprocessing.get_context("fork")
    best = dict.fromkeys(modes, 0.0)
    for _ in range(2):
        for mode in modes:
            go, done = ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_writer, args=(url, table, mode, n, go, done)) for _ in range(writers)]
            for proc in procs:
                proc.start()
            time.sleep(2.0)  # every writer connected and warmed up
            t = time.perf_counter()
            go.set()
            end = max(done.get(timeout=600) for _ in procs)
            for proc in procs:
                proc.join()
                if proc.exitcode != 0:
                    raise SystemExit(f"a {mode} writer failed (exit {proc.exitcode})")
            best[mode] = max(best[mode], writers * n / (end - t))
    return best


def fill(server: Server, store: LineageStore, target: int) -> tuple[int, float]:
    with store.engine.connect() as conn:
        have = conn.scalar(select(func.count()).select_from(LineageEvent))
        prev = conn.scalar(select(LineageEvent.hash).order_by(LineageEvent.id.desc()).limit(1))
    n = max(0, target - int(have or 0))
    t = time.perf_counter()
    with (psycopg.connect(server.conninfo("fgov_lineage", server.writer_pw)) as conn, conn.cursor() as cur,
          cur.copy(f"COPY {TABLE} ({', '.join(COLUMNS)}) FROM STDIN") as copy):
        for row in chained_rows(n, prev, seed=7):
            copy.write_row(row)
    with psycopg.connect(server.conninfo("fgov_owner", server.owner_pw), autocommit=True) as conn:
        conn.execute(f"VACUUM ANALYZE {TABLE}")
    return n, time.perf_counter() - t


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def cli(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()):
        code = fgov(list(argv))
    if code != 0:
        raise SystemExit(f"fgov {' '.join(argv[:2])} exited {code}")


def bench_queries(store: LineageStore, url: str, run_ids: list[str], n: int) -> dict[str, list[float]]:
    rng = random.Random(11)
    picks = [rng.choice(run_ids) for _ in range(n)]
    it = iter(picks * 3)
    out = {
        "show_cli": timed(lambda: cli("lineage", "show", next(it), "--db-url", url), n),
        "show_store": timed(lambda: store.events(run_id=next(it)), n),
        "runs_cli": timed(lambda: cli("runs", "list", "--db-url", url), n),
        "runs_store": timed(lambda: store.runs(limit=50), n),
    }
    # the run shown must be the whole run (25 events), not a prefix or a neighbour's
    assert len(store.events(run_id=next(it))) == len(run_template())
    return out


def old_runs_list(store: LineageStore) -> Any:
    """What `fgov runs list` ran before --limit: every run, a GROUP BY over the whole table."""
    stmt = (select(LineageEvent.dag_id, LineageEvent.run_id, func.count(), func.min(LineageEvent.created_at),
                   func.max(LineageEvent.created_at))
            .group_by(LineageEvent.dag_id, LineageEvent.run_id).order_by(func.min(LineageEvent.id)))
    with store.engine.connect() as conn:
        return conn.execute(stmt).all()


def report_queries(label: str, q: dict[str, list[float]]) -> None:
    names = {"show_cli": "fgov lineage show RUN_ID (CLI main, new connection)",
             "show_store": "  LineageStore.events(run_id) (warm connection)",
             "runs_cli": "fgov runs list (CLI main, --limit 50 default)",
             "runs_store": "  LineageStore.runs(limit=50) (warm connection)"}
    print(f"-- {label}")
    for key, name in names.items():
        v = q[key]
        goal = "" if "store" in key else f" goal <= {QUERY_GOAL_MS:.0f} ms: {_verdict(pct(v, 0.95) <= QUERY_GOAL_MS)}"
        print(f"{name:<56} n={len(v):<4} p50 {statistics.median(v):7.2f} ms  p95 {pct(v, 0.95):7.2f} ms{goal}")


def _verdict(met: bool) -> str:
    return "MET" if met else "MISSED"


def report_append(label: str, rates: dict[str, float]) -> None:
    plain = rates["plain"]
    figures = ", ".join(f"{MODES[m]} {r:.0f}/s" + ("" if m == "plain" else f" (ratio {r / plain:.2f})")
                        for m, r in rates.items())
    verdict = f"; goal >= {APPEND_GOAL:.0f}/s: {_verdict(rates['record'] >= APPEND_GOAL)}" if "record" in rates else ""
    print(f"append, {label}: {figures}{verdict}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--append", type=int, default=4000, help="events per mode and figure")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--writers", type=int, default=4, help="concurrent writer processes (default 4)")
    parser.add_argument("--no-verify", action="store_true", help="skip timing fgov audit verify on the full table")
    args = parser.parse_args()
    started = time.perf_counter()
    server = Server()
    try:
        owner_url = server.url("fgov_owner", server.owner_pw)
        writer_url = server.url("fgov_lineage", server.writer_pw)
        owner = create_engine(owner_url)
        upgrade_schema(owner, "0001")  # the first revision: the table as it was before migrations
        create_schema_grants(owner)
        table = plain_table(server)
        with owner.connect() as conn:
            version = conn.exec_driver_sql("SHOW server_version").scalar()
        print(f"PostgreSQL {version} (embedded, default settings) on 127.0.0.1:{server.port}; "
              f"{os.cpu_count()} cores; {args.append} events per figure, one transaction each")

        a0 = bench_append(writer_url, table, args.append, "r1", ("record", "plain"))
        report_append("1 writer, empty store, schema at revision 0001 (client-side path)", a0)
        t = time.perf_counter()
        revisions = create_schema(owner_url, writer_role="fgov_lineage")
        print(f"fgov db upgrade {revisions[0]} -> {revisions[1]}: {(time.perf_counter() - t) * 1000:.0f} ms")
        a1 = bench_append(writer_url, table, args.append, "head", ("record", "client", "plain"))
        report_append(f"1 writer, near-empty store, revision {revisions[1]}", a1)

        store = LineageStore(writer_url)
        n, secs = fill(server, store, args.events)
        total = store.engine.connect().scalar(select(func.count()).select_from(LineageEvent))
        print(f"fill: {n} chained events by COPY in {secs:.1f} s ({n / secs:.0f}/s, incl. hashing and VACUUM "
              f"ANALYZE); {total} events in the store")
        with store.engine.connect() as conn:
            run_ids = list(conn.scalars(select(LineageEvent.run_id).where(
                LineageEvent.run_id.startswith("manual__"), LineageEvent.event_type == "policy.decided")))
        print(f"{len(run_ids)} filled runs to sample from")

        old = timed(lambda: old_runs_list(store), 10)
        print(f"baseline: runs list before --limit (GROUP BY over all {total} events, every run) "
              f"p50 {statistics.median(old):.1f} ms p95 {pct(old, 0.95):.1f} ms")
        q = bench_queries(store, writer_url, run_ids, args.queries)
        report_queries(f"{total} events, {len(run_ids)}+ runs, indexes as at revision 0001", q)

        a2 = bench_append(writer_url, table, args.append, "full", ("record", "client", "plain"))
        report_append(f"1 writer, {total} events in the store", a2)
        store.engine.dispose()  # no pooled connection may be shared with the forked writers
        owner.dispose()
        c = bench_concurrent(writer_url, table, args.writers, args.append // args.writers,
                             ("record", "client", "plain"))
        report_append(f"{args.writers} writer processes at once, {total} events in the store", c)
        if not args.no_verify:
            t = time.perf_counter()
            result = store.verify()
            print(f"fgov audit verify over {result.checked} events: {'chain intact' if result.ok else 'BROKEN'} "
                  f"in {time.perf_counter() - t:.1f} s")
            if not result.ok:
                print("\n".join(result.problems[:5]))
                return 1
        rates = [a1["record"], a2["record"], c["record"]]
        worst = max(pct(q["show_cli"], 0.95), pct(q["runs_cli"], 0.95))
        table_row("lineage append, 1 writer, 1M events: record vs plain INSERT", baseline=a2["plain"],
                  ours=a2["record"], unit="events/s", goal=f">= {APPEND_GOAL:.0f}/s", met=a2["record"] >= APPEND_GOAL,
                  tag="P3")
        table_row("lineage append, 4 writers, 1M events: record vs plain INSERT", baseline=c["plain"],
                  ours=c["record"], unit="events/s", goal=f">= {APPEND_GOAL:.0f}/s", met=c["record"] >= APPEND_GOAL,
                  tag="P3")
        for key, label in (("show_cli", "fgov lineage show p95, 1M events"),
                           ("runs_cli", "fgov runs list p95, 1M events")):
            table_row(label, baseline=None, ours=pct(q[key], 0.95), unit="ms", goal=f"<= {QUERY_GOAL_MS:.0f} ms",
                      met=pct(q[key], 0.95) <= QUERY_GOAL_MS, tag="P3")
        print(f"summary: append through record at head {min(rates):.0f}-{max(rates):.0f} events/s (goal >= "
              f"{APPEND_GOAL:.0f}/s: {_verdict(min(rates) >= APPEND_GOAL)}); CLI p95 lineage show "
              f"{pct(q['show_cli'], 0.95):.1f} ms, runs list {pct(q['runs_cli'], 0.95):.1f} ms (goal <= "
              f"{QUERY_GOAL_MS:.0f} ms: {_verdict(worst <= QUERY_GOAL_MS)}); schema head {head_revision()}; "
              f"bench took {time.perf_counter() - started:.0f} s")
        store.engine.dispose()
        return 0
    finally:
        server.stop()


def create_schema_grants(owner: Any) -> None:
    """The grants ``create_schema`` gives the stack's writer, without migrating further than 0001."""
    with owner.begin() as conn:
        conn.execute(text(f"GRANT SELECT, INSERT ON {TABLE} TO fgov_lineage"))
        conn.execute(text(f"GRANT USAGE ON SEQUENCE {TABLE}_id_seq TO fgov_lineage"))


if __name__ == "__main__":
    sys.exit(main())

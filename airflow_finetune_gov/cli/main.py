"""``fgov``: the operator's command line (stack, vault bootstrap, lineage, runs, leases, audit)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir or os.environ.get("FGOV_STATE_DIR") or ".fgov")


def _governance_url(args: argparse.Namespace) -> str:
    if getattr(args, "db_url", None):
        return args.db_url
    if os.environ.get("FGOV_GOVERNANCE_DB_URL"):
        return os.environ["FGOV_GOVERNANCE_DB_URL"]
    from airflow_finetune_gov.stack.manager import Stack

    state = Stack(_state_dir(args)).load()
    if state and state.get("governance_db_url_file"):
        return Path(state["governance_db_url_file"]).read_text().strip()
    from airflow_finetune_gov import settings

    return settings.get("governance_db_url")


def _print(data: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(data, indent=2, default=str))


def cmd_stack(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.stack.manager import Stack, StackOptions

    stack = Stack(_state_dir(args))
    if args.action == "up":
        state = stack.up(StackOptions(
            state_dir=stack.dir, dags_folder=Path(args.dags_folder), postgres_port=args.postgres_port,
            openbao_port=args.openbao_port, airflow_port=args.airflow_port, policy_file=args.policy_file,
            postgres_url=args.postgres_url or os.environ.get("FGOV_POSTGRES_URL"),
            notify_smtp_url=args.notify_smtp_url or "", notify_webhook_url=args.notify_webhook_url or "",
        ))
        print(f"Airflow UI:  {state['airflow']['url']}  (users: {', '.join(state['airflow']['users'])}; "
              f"passwords in {state['airflow']['passwords_file']})")
        print(f"OpenBao:     {state['openbao']['addr']}")
        print(f"PostgreSQL:  {state['postgres']['host']}:{state['postgres']['port']}")
        print(f"State:       {stack.state_file}")
        return 0
    if args.action == "down":
        stopped = stack.down()
        print(f"stack down: stopped {len(stopped)} process(es)")
        return 0
    if args.action == "restart":
        if not args.component:
            print("fgov stack restart: name the component: openbao, api-server, scheduler, dag-processor or "
                  "triggerer", file=sys.stderr)
            return 2
        stack.restart(args.component)
        return 0
    status = stack.status()
    if args.json:
        _print(status, True)
    else:
        print(f"state: {status['state_dir']}  running: {status['running']}")
        for p in status["processes"]:
            print(f"  {p['name']:<22} pid {p['pid']:<8} {'up' if p['alive'] else 'DOWN'}")
        if status.get("airflow_health"):
            print(f"  airflow health: {status['airflow_health']}")
    return 0 if status["running"] else 3


def cmd_vault(args: argparse.Namespace) -> int:
    import hvac

    from airflow_finetune_gov.policy.engine import load_policy
    from airflow_finetune_gov.stack.provision import SERVICE_GROUPS, group_role
    from airflow_finetune_gov.vault.bootstrap import BootstrapSpec, DatasetGrant, bootstrap

    token = os.environ.get("VAULT_TOKEN") or os.environ.get("BAO_TOKEN")
    if not token:
        print("fgov vault bootstrap: set VAULT_TOKEN (or BAO_TOKEN) to a token allowed to configure mounts, "
              "auth methods and policies", file=sys.stderr)
        return 2
    db_password = os.environ.get("FGOV_VAULT_DB_PASSWORD")
    if not db_password:
        print("fgov vault bootstrap: set FGOV_VAULT_DB_PASSWORD to the password of the database role that "
              "OpenBao/Vault uses to create dataset credentials", file=sys.stderr)
        return 2
    policy = load_policy(args.policy_file)
    summary = bootstrap(hvac.Client(url=args.addr, token=token), BootstrapSpec(
        db_connection_url=args.db_connection_url, db_username=args.db_username, db_password=db_password,
        datasets=[DatasetGrant(n, group_role(n)) for n in policy.datasets],
        service_roles=SERVICE_GROUPS,
        jwt_public_key_pem=Path(args.jwt_public_key).read_text(),
        default_ttl=f"{policy.lease['default_ttl_minutes']}m", max_ttl=f"{policy.lease['max_ttl_minutes']}m",
    ))
    keys = Path(args.provenance_keys_out)
    keys.write_text(json.dumps({"keys": summary.pop("provenance_public_keys")}, indent=2))
    summary["provenance_keys_path"] = str(keys.resolve())
    signing_pem = keys.with_name("model-signing.pub.pem")
    signing_pem.write_text(summary.pop("model_signing_public_key"))
    summary["model_signing_public_key_path"] = str(signing_pem.resolve())
    print(json.dumps(summary, indent=2))
    print(f"set [finetune_gov] provenance_keys_path = {keys.resolve()} (public keys: promotion and "
          "`fgov models verify` check signatures against them); give model users "
          f"{signing_pem.resolve()} for `model_signing verify key`", file=sys.stderr)
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.lineage.store import LineageStore

    store = LineageStore(_governance_url(args))
    events = store.events(run_id=args.run_id, dag_id=args.dag_id)
    if not events:
        print(f"no lineage events for run {args.run_id}", file=sys.stderr)
        return 1
    if args.json:
        _print([e.to_dict() for e in events], True)
        return 0
    from airflow_finetune_gov.lineage.runs import RUN_STARTED, incarnations

    runs = incarnations(e for e in events if e.event_type == RUN_STARTED)
    print(f"lineage of {events[0].dag_id} / {args.run_id}: {len(events)} event(s)"
          + (f", {len(runs)} runs under this run id (deleted and triggered again)" if len(runs) > 1 else ""))
    for e in events:
        begins = next((r for r in runs if r.first_event_id == e.id), None)
        if begins is not None:
            print(f"  -- run dag_run.id {begins.dag_run_id} ({runs.index(begins) + 1} of {len(runs)}): its governed "
                  "tasks read only the events from here" + (" to the next run" if begins.next_event_id else ""))
        payload = e.payload_dict()
        summary = ", ".join(f"{k}={_short(v)}" for k, v in payload.items() if k in _SUMMARY_KEYS and v != "")
        print(f"  #{e.id:<5} {e.created_at[:19]}  {e.task_id:<16} try {e.try_number}  {e.event_type:<24} "
              f"by {e.actor:<12} {summary}")
    return 0


_SUMMARY_KEYS = ("dag_run_id", "start_date", "tier", "option", "responder", "purpose", "lease_id", "db_role",
                 "dataset", "ttl_seconds", "lease_duration", "rows", "content_sha256", "version", "verdict", "alias",
                 "reason", "error", "prompts", "detector", "flipped", "outcome", "reviewed_by", "lease_number",
                 "limit", "flagged", "flagged_share")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 28 else text[:12] + "…" + text[-8:]


def cmd_runs(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.lineage.store import LineageStore

    runs = LineageStore(_governance_url(args)).runs(limit=args.limit or None)
    if args.json:
        _print(runs, True)
        return 0
    for r in runs:
        print(f"{r['dag_id']:<28} {r['run_id']:<48} events {r['events']:<4} {r['first'][:19]} .. {r['last'][:19]}")
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine
    from sqlalchemy.exc import SQLAlchemyError

    from airflow_finetune_gov.lineage.store import LineageError, create_schema, head_revision, schema_revision

    url = _governance_url(args)
    head = head_revision()
    try:
        if args.action == "status":
            engine = create_engine(url)
            try:
                current = schema_revision(engine)
            finally:
                engine.dispose()
            print(f"lineage schema: revision {current or 'none (empty, or made before migrations)'}; newest {head}")
            return 0 if current == head else 1
        before, after = create_schema(url, writer_role=args.writer_role, reader_roles=tuple(args.reader_role))
    except (LineageError, SQLAlchemyError) as exc:
        # e.g. the writer's URL: it may not change the schema (the migration's transaction rolled back).
        print(f"fgov db {args.action}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"lineage schema: {before or 'none'} -> {after}" if before != after else f"lineage schema at {after}")
    return 0


def cmd_evidence(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.lineage.evidence import evidence, render_html, to_json
    from airflow_finetune_gov.lineage.store import LineageStore

    events = LineageStore(_governance_url(args)).events(run_id=args.run_id, dag_id=args.dag_id)
    if len({e.dag_id for e in events}) > 1:
        print(f"fgov evidence: run {args.run_id} exists in several DAGs; name one with --dag-id", file=sys.stderr)
        return 2
    try:
        pack = evidence(events)
    except ValueError as exc:
        print(f"fgov evidence: {exc} ({args.run_id})", file=sys.stderr)
        return 2
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evidence.json").write_text(to_json(pack))
        (out / "evidence.html").write_text(render_html(pack))
    if args.json:
        print(to_json(pack))
    else:
        print(f"evidence for {pack['dag_id']} / {pack['run_id']} ({pack['events']} events)")
        for title, controls in [("run", pack["controls"])] + [
                (f"chain {c['group']} [{c['map_index']}]", c["controls"]) for c in pack["chains"]]:
            print(f"{title}:")
            for c in controls:
                print(f"  {c['status']:<8} {c['title']}: {c['detail']}")
        if args.out:
            print(f"written: {Path(args.out) / 'evidence.json'}, {Path(args.out) / 'evidence.html'}")
    return 0 if pack["ok"] else 1


def cmd_audit(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.lineage.store import LineageStore

    result = LineageStore(_governance_url(args)).verify()
    if args.json:
        _print({"ok": result.ok, "checked": result.checked, "problems": result.problems}, True)
    else:
        print(f"checked {result.checked} event(s): {'chain intact' if result.ok else 'CHAIN BROKEN'}")
        for p in result.problems:
            print(f"  {p}")
    return 0 if result.ok else 1


def _use_stack_airflow(args: argparse.Namespace) -> None:
    """Point Airflow's config at the embedded stack's, unless the environment already chose one."""
    if os.environ.get("AIRFLOW_HOME"):
        return
    from airflow_finetune_gov.stack.manager import Stack

    state = Stack(_state_dir(args)).load()
    if state:
        os.environ["AIRFLOW_HOME"] = state["airflow"]["home"]


def _export_connection(conn_id: str) -> None:
    """Outside a task, the Task SDK resolves connections from env and secrets backends but not from the
    metadata database: look the connection up the way the ``airflow`` CLI does and hand it to this
    process (only) as ``AIRFLOW_CONN_<ID>``."""
    env_key = f"AIRFLOW_CONN_{conn_id.upper()}"
    if env_key in os.environ:
        return
    from airflow.models.connection import Connection

    os.environ[env_key] = Connection.get_connection_from_secrets(conn_id).as_json()


def _orm_run_state(dag_id: str, run_id: str) -> str | None:
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        state = session.scalar(select(DagRun.state).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    return None if state is None else str(getattr(state, "value", state))


def cmd_leases(args: argparse.Namespace) -> int:
    if args.action == "list":
        from datetime import UTC, datetime

        from airflow_finetune_gov.credentials.lifecycle import lease_states
        from airflow_finetune_gov.lineage.store import LineageStore

        store = LineageStore(_governance_url(args))
        now = datetime.now(UTC)
        rows = [s.to_dict() | {"expired": s.expired(now)}
                for s in lease_states(store.events(event_prefix="lease.")).values() if args.all or not s.settled]
        if args.json:
            _print(rows, True)
            return 0
        if not rows:
            print("no unsettled leases" if not args.all else "no leases recorded")
            return 0
        for r in rows:
            print(f"{r['status']:<14} {r['dataset']:<10} {r['db_role']:<40} expires {r['expires_at']}"
                  f"{' (expired)' if r['expired'] else ''}  {r['dag_id']}/{r['run_id']}"
                  + (f"  last error: {r['last_error']}" if r["last_error"] else ""))
        return 0
    _use_stack_airflow(args)
    from airflow_finetune_gov import settings
    from airflow_finetune_gov.credentials.operators import run_sweep

    _export_connection(settings.get("vault_conn_id"))
    results = run_sweep(_orm_run_state, dry_run=args.dry_run)
    if args.json:
        _print(results, True)
    else:
        for r in results:
            state = r["run_state"] or "not found"
            print(f"{r['action']:<13} {r['lease_id']}  run {r['dag_id']}/{r['run_id']} ({state})"
                  + (f"  {r['detail']}" if r["detail"] else ""))
        done = sum(r["action"] == "revoked" for r in results)
        failed = sum(r["action"] == "failed" for r in results)
        print(f"sweep: {done} revoked and verified, {failed} failed, "
              f"{sum(r['action'] == 'skipped' for r in results)} left to running jobs")
    return 1 if any(r["action"] == "failed" for r in results) else 0


def cmd_control_plane(args: argparse.Namespace) -> int:
    """Serve the control plane (the embedded stack starts it; a deployment runs it as a service)."""
    import logging
    import pwd
    from pathlib import Path

    from airflow_finetune_gov import common, settings
    from airflow_finetune_gov.control import notify, teams
    from airflow_finetune_gov.control.server import ControlPlane, serve

    _use_stack_airflow(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    common.SERVING = True  # in this process the provider's functions act themselves
    user = args.task_user or settings.get("task_user")
    try:
        task_uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        print(f"fgov: the task user {user!r} does not exist: create it or set [finetune_gov] task_user",
              file=sys.stderr)
        return 2
    for option in ("governance_db_url", "vault_conn_id", "datasets_monitor_url"):
        settings.get(option)  # a missing setting fails here, naming it, and not at a task's first call
    _export_connection(settings.get("vault_conn_id"))
    socket_path = Path(args.socket or settings.get("control_plane_socket"))
    if args.warm_demo_models:
        _warm_demo_models([m for m in args.warm_demo_models.split(",") if m])
    plane = ControlPlane(task_uid=task_uid)
    try:
        notify.start(common.lineage_store(), plane.appender().record)
    except notify.NotifyConfigError as exc:
        print(f"fgov control-plane: {exc}", file=sys.stderr)
        return 2
    teams.start(float(settings.get("teams_sync_seconds")))  # each team's Airflow role reaches its DAGs only
    serve(socket_path, plane)
    return 0


def _warm_demo_models(names: list[str]) -> None:
    """Build the named demo base models in the background while the control plane serves, so the first policy
    check (whose screening asks the base model) does not wait for the build; a check that comes sooner waits on
    the store's lock. A failure is logged and left to the first use, which reports it."""
    import logging
    import threading

    from airflow_finetune_gov import settings
    from airflow_finetune_gov.registry.store import ModelStore
    from airflow_finetune_gov.tuning.backends import DEMO_MODELS, ensure_demo_base

    unknown = [n for n in names if n not in DEMO_MODELS]
    if unknown:
        raise SystemExit(f"fgov control-plane serve: --warm-demo-models {','.join(unknown)}: the demo models are "
                         f"{', '.join(sorted(DEMO_MODELS))}")

    def build() -> None:
        for name in names:
            try:
                ensure_demo_base(ModelStore(settings.get("model_store")), name)
                logging.getLogger(__name__).info("demo base model %s ready", name)
            except Exception:
                logging.getLogger(__name__).exception("demo base model %s not built ahead", name)

    threading.Thread(target=build, name="warm-demo-models", daemon=True).start()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fgov", description="airflow-finetune-gov operations")
    parser.add_argument("--state-dir", help="stack state directory (default ./.fgov or $FGOV_STATE_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)

    stack = sub.add_parser("stack", help="the embedded PostgreSQL + OpenBao + Airflow stack")
    stack.add_argument("action", choices=["up", "down", "status", "restart"])
    stack.add_argument("component", nargs="?", help="restart: openbao, api-server, scheduler, dag-processor or "
                       "triggerer (OpenBao comes back unsealed, with its leases)")
    stack.add_argument("--dags-folder", default="dags")
    stack.add_argument("--postgres-port", type=int)
    stack.add_argument("--postgres-url", help="use this existing server (a superuser URL) instead of the embedded one")
    stack.add_argument("--openbao-port", type=int)
    stack.add_argument("--airflow-port", type=int)
    stack.add_argument("--policy-file")
    stack.add_argument("--notify-smtp-url", help="e-mail approval notifications through this SMTP server "
                       "(smtp://host:port); addresses are <user>@localhost")
    stack.add_argument("--notify-webhook-url", help="post approval notifications to this Slack-compatible webhook")
    stack.add_argument("--json", action="store_true")
    stack.set_defaults(func=cmd_stack)

    vault = sub.add_parser("vault", help="configure your own Vault/OpenBao")
    vault_sub = vault.add_subparsers(dest="action", required=True)
    boot = vault_sub.add_parser("bootstrap", help="database engine, JWT auth, policies and roles (idempotent)")
    boot.add_argument("--addr", default=os.environ.get("VAULT_ADDR") or os.environ.get("BAO_ADDR")
                      or "http://127.0.0.1:8200")
    boot.add_argument("--db-connection-url", required=True,
                      help="e.g. postgresql://{{username}}:{{password}}@db:5432/postgres")
    boot.add_argument("--db-username", default="fgov_vault")
    boot.add_argument("--jwt-public-key", required=True, help="PEM public key of the workload-identity signer")
    boot.add_argument("--policy-file")
    boot.add_argument("--provenance-keys-out", default="fgov-provenance-keys.json",
                      help="where to write the provenance signing key's public keys (JSON)")
    boot.set_defaults(func=cmd_vault)

    lineage = sub.add_parser("lineage", help="the lineage record of a run")
    lineage_sub = lineage.add_subparsers(dest="action", required=True)
    show = lineage_sub.add_parser("show", help="every event of one DAG run")
    show.add_argument("run_id")
    show.add_argument("--dag-id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--db-url")
    show.set_defaults(func=cmd_lineage)

    runs = sub.add_parser("runs", help="governed runs")
    runs_sub = runs.add_subparsers(dest="action", required=True)
    rl = runs_sub.add_parser("list")
    rl.add_argument("--json", action="store_true")
    rl.add_argument("--limit", type=int, default=50,
                    help="the N runs with the most recent events, newest first (default 50; 0: every run)")
    rl.add_argument("--db-url")
    rl.set_defaults(func=cmd_runs)

    db = sub.add_parser("db", help="the lineage schema (Alembic migrations)")
    db_sub = db.add_subparsers(dest="action", required=True)
    du = db_sub.add_parser("upgrade", help="migrate to the newest revision, adopting a pre-migration table")
    du.add_argument("--db-url", help="a URL of the schema's owner (the writer role may not change it)")
    du.add_argument("--writer-role", help="database role granted INSERT and SELECT (e.g. fgov_lineage)")
    du.add_argument("--reader-role", action="append", default=[], help="role granted SELECT (repeatable)")
    du.set_defaults(func=cmd_db)
    ds = db_sub.add_parser("status", help="current and newest revision; exit 1 if behind")
    ds.add_argument("--db-url")
    ds.set_defaults(func=cmd_db)

    leases = sub.add_parser("leases", help="credential leases recorded in lineage")
    leases_sub = leases.add_subparsers(dest="action", required=True)
    ll = leases_sub.add_parser("list", help="leases not yet verified revoked (--all: every lease)")
    ll.add_argument("--all", action="store_true")
    ll.add_argument("--json", action="store_true")
    ll.add_argument("--db-url")
    ll.set_defaults(func=cmd_leases)
    ls = leases_sub.add_parser("sweep", help="revoke and verify leases of finished runs and expired leases")
    ls.add_argument("--dry-run", action="store_true")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_leases)

    audit = sub.add_parser("audit", help="verify the lineage hash chain")
    audit_sub = audit.add_subparsers(dest="action", required=True)
    av = audit_sub.add_parser("verify")
    av.add_argument("--json", action="store_true")
    av.add_argument("--db-url")
    av.set_defaults(func=cmd_audit)

    ev = sub.add_parser("evidence", help="the evidence pack of one run: each control and what lineage shows")
    ev.add_argument("run_id")
    ev.add_argument("--dag-id")
    ev.add_argument("--out", help="write evidence.json and evidence.html into this folder")
    ev.add_argument("--json", action="store_true")
    ev.add_argument("--db-url")
    ev.set_defaults(func=cmd_evidence)

    control = sub.add_parser("control-plane", help="the governance control plane (holds the keys tasks must not)")
    control_sub = control.add_subparsers(dest="action", required=True)
    serve_p = control_sub.add_parser("serve", help="serve on [finetune_gov] control_plane_socket until killed")
    serve_p.add_argument("--socket", help="default: [finetune_gov] control_plane_socket")
    serve_p.add_argument("--warm-demo-models", default="",
                         help="demo base models to build in the background at start (e.g. fgov-demo-tiny): the "
                              "embedded stack's first policy check then does not wait for the build")
    serve_p.add_argument("--task-user", help="default: [finetune_gov] task_user")
    serve_p.set_defaults(func=cmd_control_plane)

    from airflow_finetune_gov.cli.eval_cmd import add_parser as add_eval
    from airflow_finetune_gov.cli.models_cmd import add_parser as add_models

    add_eval(sub)
    add_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from airflow_finetune_gov.stack.procs import StackError

    try:
        return int(args.func(args) or 0)
    except StackError as exc:
        print(f"fgov: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

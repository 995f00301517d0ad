"""``fgov models show|verify|rollback``: the model store's aliases, a version's signed provenance, and a
rollback that goes through the governed path (the ``governed_rollback`` DAG: policy, approval in Airflow,
then the move).

The CLI never moves an alias itself: it asks Airflow, as you, to run the rollback DAG, so the rollback
needs its own approval and is recorded in lineage like any other change.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

ROLLBACK_DAG = "governed_rollback"


def _stack(args: argparse.Namespace) -> Any:
    from airflow_finetune_gov.cli.main import _state_dir
    from airflow_finetune_gov.stack.manager import Stack

    return Stack(_state_dir(args))


def _path(given: str | None, args: argparse.Namespace, state_key: str, option: str) -> Path:
    """An explicit ``--flag`` value, else the embedded stack's, else ``[finetune_gov] option``."""
    if given:
        return Path(given)
    state = _stack(args).load()
    if state and state.get(state_key):
        return Path(state[state_key])
    from airflow_finetune_gov import settings

    return Path(settings.get(option))


def _store_root(args: argparse.Namespace) -> Path:
    return _path(args.model_store, args, "model_store", "model_store")


def cmd_models_show(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.registry.store import ModelStore

    store = ModelStore(_store_root(args))
    aliases = store.aliases(args.name)
    if not aliases:
        print(f"fgov models show: no aliases for model {args.name!r} in {store.root}", file=sys.stderr)
        return 1
    history = aliases.pop("_history", [])
    if args.json:
        print(json.dumps({"aliases": aliases, "history": history}, indent=2))
        return 0
    for alias, current in sorted(aliases.items()):
        print(f"{args.name}:{alias} -> {current['version']} (by {current['by']}, run {current['run']})")
    print("history:")
    for h in history:
        print(f"  {h['at'][:19]}  {h['alias']:<11} {h['from'] or '-':>16} -> {h['to']:<16} by {h['by']}  {h['run']}")
    return 0


def _keys_path(args: argparse.Namespace) -> Path:
    return _path(args.keys, args, "provenance_keys", "provenance_keys_path")


def cmd_models_verify(args: argparse.Namespace) -> int:
    """Check a version's signed provenance offline: the signature (public keys only) and every file's digest."""
    from airflow_finetune_gov.registry import provenance
    from airflow_finetune_gov.registry.store import ModelStore, RegistryError

    store = ModelStore(_store_root(args))
    try:
        keys = provenance.load_public_keys(_keys_path(args))
        statement = provenance.verify_model(store, args.name, args.version, keys)
    except (provenance.ProvenanceError, RegistryError) as exc:
        print(f"fgov models verify: FAILED: {exc}", file=sys.stderr)
        return 1
    envelope = json.loads((store.path(args.name, args.version) / provenance.ENVELOPE_FILE).read_text())
    if args.json:
        print(json.dumps({"verified": True, "keyid": envelope["signatures"][0]["keyid"], "statement": statement},
                         indent=2))
        return 0
    build = statement["predicate"]["buildDefinition"]
    internal = build.get("internalParameters", {})
    meta = statement["predicate"].get("runDetails", {}).get("metadata", {})
    approval, evaluation = internal.get("approval") or {}, internal.get("evaluation") or {}
    print(f"{args.name} {args.version}: provenance verified (signed by {envelope['signatures'][0]['keyid']}); "
          f"{len(statement['subject'])} file(s) match their signed digests")
    print(f"  built by   {meta.get('invocationId')} ({build['buildType']})")
    for dep in build.get("resolvedDependencies", []):
        print(f"  from       {dep['uri']} sha256 {dep['digest']['sha256'][:16]}")
    if approval:
        print(f"  approved   tier {approval.get('tier')} by {', '.join(approval.get('approvers') or []) or 'policy'}; "
              f"requested by {approval.get('requester')}; policy sha256 {str(internal.get('policy_sha256'))[:16]}")
    if evaluation:
        print(f"  evaluated  verdict {evaluation.get('verdict')}"
              + (f", accepted by {evaluation['reviewed_by']}" if evaluation.get("reviewed_by") else ""))
    return 0


def _client(args: argparse.Namespace) -> Any:
    from airflow_finetune_gov.stack.client import AirflowClient

    if args.airflow_url:
        password = os.environ.get("FGOV_AIRFLOW_PASSWORD")
        if not password:
            raise ValueError("set FGOV_AIRFLOW_PASSWORD to your Airflow password (the rollback runs as you)")
        return AirflowClient(args.airflow_url, args.user, password)
    stack = _stack(args)
    state = stack.load()
    if not state:
        raise ValueError("no embedded stack is up here: give --airflow-url (and FGOV_AIRFLOW_PASSWORD)")
    return AirflowClient(state["airflow"]["url"], args.user, stack.airflow_password(args.user))


def cmd_models_rollback(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.stack.procs import StackError

    try:
        client = _client(args)
        client.wait_for_dag(ROLLBACK_DAG, timeout=60)
        run_id = client.trigger(ROLLBACK_DAG, {"model": args.name, "alias": args.alias, "to_version": args.to})
    except (ValueError, StackError, KeyError) as exc:
        print(f"fgov models rollback: {exc}", file=sys.stderr)
        return 2
    print(f"rollback of {args.name}:{args.alias} to {args.to} requested as {args.user}: run {run_id} of "
          f"{ROLLBACK_DAG}; an approver answers it under Required Actions in Airflow")
    if not args.wait:
        return 0
    state = client.wait_run(ROLLBACK_DAG, run_id, timeout=args.wait)
    print(f"run {run_id}: {state} ({client.task_states(ROLLBACK_DAG, run_id)})")
    return 0 if state == "success" else 1


def add_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="model aliases, signed provenance, and governed rollbacks")
    models_sub = models.add_subparsers(dest="action", required=True)
    show = models_sub.add_parser("show", help="a model's aliases and their history")
    show.add_argument("name")
    show.add_argument("--model-store", help="default: the embedded stack's, else [finetune_gov] model_store")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=cmd_models_show)
    ver = models_sub.add_parser("verify", help="check a version's signed provenance and its files (exit 1 if not)")
    ver.add_argument("name")
    ver.add_argument("version")
    ver.add_argument("--model-store", help="default: the embedded stack's, else [finetune_gov] model_store")
    ver.add_argument("--keys", help="public keys JSON (default: the stack's, else [finetune_gov] "
                                    "provenance_keys_path)")
    ver.add_argument("--json", action="store_true")
    ver.set_defaults(func=cmd_models_verify)
    rb = models_sub.add_parser("rollback", help="ask Airflow to roll an alias back (needs its own approval)")
    rb.add_argument("name")
    rb.add_argument("--to", required=True, help="a version this alias held before")
    rb.add_argument("--alias", default="production")
    rb.add_argument("--user", default=os.environ.get("FGOV_AIRFLOW_USER", "requester"),
                    help="who asks (never the approver of their own request)")
    rb.add_argument("--airflow-url", help="your Airflow (default: the embedded stack's)")
    rb.add_argument("--wait", type=float, default=0, help="wait up to this many seconds for the outcome")
    rb.set_defaults(func=cmd_models_rollback)

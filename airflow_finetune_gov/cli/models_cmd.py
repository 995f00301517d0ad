"""``fgov models import|show|verify|rollback``: a local model directory registered as a base model, the model
store's aliases, a version's signed provenance, and a rollback that goes through the governed path (the
``governed_rollback`` DAG: policy, approval in Airflow, then the move).

The CLI never moves a serving alias itself: it asks Airflow, as you, to run the rollback DAG, so the
rollback needs its own approval and is recorded in lineage like any other change. ``import`` sets the
model's ``base`` alias only (what tuning starts from), recorded in the alias history with who and when.
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


def cmd_models_import(args: argparse.Namespace) -> int:
    """Register a local model directory (a Hugging Face checkpoint: ``config.json``, weights, tokenizer) as a
    base model: its files copied into the store and hashed as they are copied (memory does not grow with the
    model), the manifest recording who imported it, when, from where and every file's digest, and the
    model's ``base`` alias set to it."""
    import getpass
    import time
    from datetime import UTC, datetime

    from airflow_finetune_gov.registry.store import ModelStore, RegistryError

    source = Path(args.path)
    if not source.is_dir():
        print(f"fgov models import: {source} is not a directory: give the model's directory (the one with "
              "config.json and the weights)", file=sys.stderr)
        return 2
    entries = sorted(source.iterdir())
    hidden = [e.name for e in entries if e.name.startswith(".")]
    nested = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
    files = [e.name for e in entries if not e.name.startswith(".") and e.is_file()]
    if nested:
        print(f"fgov models import: {source} has subdirectories ({', '.join(nested)}): only the files at its top "
              "level are a model here; import the directory that holds config.json and the weights",
              file=sys.stderr)
        return 2
    if not files:
        print(f"fgov models import: {source} has no files to import", file=sys.stderr)
        return 2
    who = os.environ.get("SUDO_USER") or getpass.getuser()
    store = ModelStore(_store_root(args))
    metadata = {"kind": "base", "format": "hf-causal-lm" if "config.json" in files else "files",
                "imported_by": who, "imported_at": datetime.now(UTC).isoformat().replace("+00:00", "Z"),
                "source": str(source.resolve())}
    started = time.monotonic()
    try:
        manifest = store.put_dir(args.name, source, files, metadata, follow_symlinks=True)
        if not args.no_alias:
            store.set_alias(args.name, "base", manifest["version"], by=who, run="fgov models import")
    except RegistryError as exc:
        print(f"fgov models import: {exc}", file=sys.stderr)
        return 2
    _give_to_store_owner(store.root, args.name)
    seconds = time.monotonic() - started
    size = sum((store.path(args.name, manifest["version"]) / f).stat().st_size for f in manifest["files"])
    if args.json:
        print(json.dumps({"name": args.name, "version": manifest["version"], "sha256": manifest["sha256"],
                          "files": manifest["files"], "bytes": size, "seconds": round(seconds, 2),
                          "skipped": hidden, "alias": None if args.no_alias else "base"}, indent=2))
        return 0
    moved = "" if args.no_alias else f"; {args.name}:base -> {manifest['version']}"
    print(f"imported {args.name} {manifest['version']}: {len(files)} files, {size / 2**20:.1f} MiB in {seconds:.1f}s "
          f"(sha256 {manifest['sha256'][:16]}){moved}")
    if hidden:
        print(f"skipped hidden entries: {', '.join(hidden)}")
    return 0


def _give_to_store_owner(root: Path, name: str) -> None:
    """Run as root on a store another user owns (the control plane's), what the import wrote becomes theirs:
    the control plane must be able to write the model's aliases later."""
    import pwd

    owner = root.stat().st_uid
    if os.geteuid() != 0 or owner == 0:
        return
    from airflow_finetune_gov.stack.users import own_tree

    own_tree(root / name, pwd.getpwuid(owner), 0o755)


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
    imp = models_sub.add_parser("import", help="register a local model directory as a base model (alias base)")
    imp.add_argument("name", help="the model's name in the store (the policy's models entry)")
    imp.add_argument("path", help="the model's directory: config.json, weights, tokenizer files")
    imp.add_argument("--model-store", help="default: the embedded stack's, else [finetune_gov] model_store")
    imp.add_argument("--no-alias", action="store_true", help="store the version without moving the base alias")
    imp.add_argument("--json", action="store_true")
    imp.set_defaults(func=cmd_models_import)
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

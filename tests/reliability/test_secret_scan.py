"""After a full demo run (the benign tune approved and promoted, the poisoned one blocked), on a stack
that has run every earlier test of the session, no secret OpenBao issued in the whole session is
readable anywhere: not in any file the stack wrote (process logs, task logs, OpenBao's audit log,
OpenLineage events, the model store with its reports and provenance, the state file), and not in the
Airflow or governance databases (dumped whole: XCom, rendered fields, HITL answers, run conf, lineage).

The secrets come from a test-only raw audit device (conftest): every database password, wrapping
token and client token OpenBao handed out, and the root token itself; and the notification webhook's
secret URL, which only the control plane's own configuration holds."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from receivers import WebhookReceiver
from support import StackView, issued_secrets

from airflow_finetune_gov.demo import run_one
from airflow_finetune_gov.stack import postgres
from airflow_finetune_gov.stack.manager import Stack
from airflow_finetune_gov.stack.provision import DATASETS_DB, GOVERNANCE_DB

pytestmark = pytest.mark.stack


def database_dump(stack: Stack, state: dict, db: str) -> bytes:
    env = {**os.environ, "PGPASSWORD": Path(state["postgres"]["superuser_password_file"]).read_text()}
    done = subprocess.run([str(postgres.bin_dir() / "pg_dump"), "--data-only", "-h", "127.0.0.1", "-p",
                           str(state["postgres"]["port"]), "-U", "postgres", db],
                          env=env, capture_output=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert len(done.stdout) > 1000
    return done.stdout


def test_no_issued_secret_is_readable_anywhere_after_a_full_demo_run(stack: Stack, webhook: WebhookReceiver) -> None:
    outcomes = {ds: run_one(stack, ds, "staging", manual=False) for ds in ("benign", "poisoned")}
    assert {ds: o[1] for ds, o in outcomes.items()} == {"benign": "success", "poisoned": "failed"}
    # the second evaluation of the same base asked the base nothing: its answers were kept from the first
    (kept,) = StackView(stack).events(outcomes["poisoned"][0], "evaluation.completed")
    kept = kept.payload_dict()
    assert kept["baseline_answers_kept"] == kept["prompts"] == 1112, kept
    state = stack.load()
    assert state is not None
    raw = Path(state["openbao"]["audit_log"]).parent / "audit-raw.log"
    secrets = issued_secrets(raw)
    secrets["root token"] = [Path(state["openbao"]["root_token_file"]).read_text()]
    secrets["webhook URL"] = [webhook.token]  # the notification webhook's secret path (the control plane's config)
    assert webhook.posts, "the control plane posted no notification: the webhook's secret was never used"
    assert len(secrets["password"]) >= 6 and secrets["wrap token"] and len(secrets["client token"]) >= 20, {
        k: len(v) for k, v in secrets.items()}

    haystacks: dict[str, bytes] = {}
    # where secrets are kept on purpose (the control plane's configuration holds the webhook URL); the DB is dumped
    skip = [stack.dir / "secrets", stack.dir / "postgres", stack.dir / "control-plane" / "airflow.cfg"]
    for path in stack.dir.rglob("*"):
        if path.is_file() and path != raw and not any(path.is_relative_to(s) for s in skip):
            haystacks[str(path.relative_to(stack.dir))] = path.read_bytes()
    for must in ("logs/openbao.log", "openbao/audit.log", "logs/openlineage.jsonl", "logs/airflow-scheduler.log"):
        assert must in haystacks, f"{must} was not scanned"
    for run_id, *_ in outcomes.values():  # the demo runs' task logs are among them
        assert sum(1 for name in haystacks if f"run_id={run_id}/" in name) >= 6, run_id
    for db in ("airflow", GOVERNANCE_DB, DATASETS_DB):
        haystacks[f"database {db}"] = database_dump(stack, state, db)
    leaks = [(kind, where, value[:4] + "…") for kind, values in secrets.items() for value in values
             for where, text in haystacks.items() if value.encode() in text]
    assert leaks == []

    # OpenBao's own audit log saw every one of those responses, and kept the secret fields HMAC-ed
    audited = [json.loads(line) for line in Path(state["openbao"]["audit_log"]).read_text().splitlines()]
    passwords = [data["password"] for e in audited if e.get("type") == "response"
                 and e["request"]["path"].startswith("fgov-database/creds/")
                 and "password" in (data := (e.get("response") or {}).get("data") or {})]
    assert len(passwords) == len(secrets["password"])
    assert all(p.startswith("hmac-sha256:") for p in passwords)

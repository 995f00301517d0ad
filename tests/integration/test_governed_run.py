"""The governed demo DAG end to end on the real stack: real Airflow users over REST, real OpenBao
leases, real PostgreSQL roles, the lineage record in the governance database."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import hvac
import hvac.exceptions
import psycopg
import pytest
from receivers import Mailbox
from serving import build_judge, serve_model
from support import StackView, issued_secrets, model_signing_verify

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.datasets.demo import BENIGN_SET
from airflow_finetune_gov.demo import SETTLE_SECONDS
from airflow_finetune_gov.evaluation import builtin_suites
from airflow_finetune_gov.lineage.runs import RUN_STARTED
from airflow_finetune_gov.lineage.store import LineageStore
from airflow_finetune_gov.registry.store import ModelStore
from airflow_finetune_gov.stack.client import AirflowClient
from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack
DAG_TASKS = {"policy_check", "approval_gate", "acquire_lease", "tune", "revoke_lease", "evaluate", "promote"}


def client(stack: Stack, user: str) -> AirflowClient:
    state = stack.load()
    assert state is not None
    return AirflowClient(state["airflow"]["url"], user, stack.airflow_password(user))


def state_of(stack: Stack) -> dict[str, Any]:
    state = stack.load()
    assert state is not None
    return state


def lineage(stack: Stack, run_id: str) -> list[Any]:
    state = stack.load()
    assert state is not None
    return LineageStore(Path(state["governance_db_url_file"]).read_text()).events(run_id=run_id)


def superuser(stack: Stack, db: str = "postgres") -> psycopg.Connection:
    state = stack.load()
    assert state is not None
    pw = Path(state["postgres"]["superuser_password_file"]).read_text()
    return psycopg.connect(host="127.0.0.1", port=state["postgres"]["port"], user="postgres", password=pw,
                           dbname=db, autocommit=True)


def bao(stack: Stack) -> hvac.Client:
    state = stack.load()
    assert state is not None
    return hvac.Client(url=state["openbao"]["addr"], token=Path(state["openbao"]["root_token_file"]).read_text())


def screened_at(events: list[Any]) -> int:
    return next(e.id for e in events if e.event_type == "dataset.screened")


def decided_at(events: list[Any]) -> int:
    return next(e.id for e in events if e.event_type == "policy.decided")


def start_run(stack: Stack, dataset: str = "benign", env: str = "staging", base_model: str = "fgov-demo-tiny",
              detector: str = "pattern") -> tuple[AirflowClient, str]:
    requester = client(stack, "requester")
    requester.wait_for_dag(DEMO_DAG_ID)
    run_id = requester.trigger(DEMO_DAG_ID, {"dataset": dataset, "target_environment": env, "base_model": base_model,
                                             "detector": detector})
    # the session's first policy check may wait for the demo model the control plane builds at start
    requester.wait_task_state(DEMO_DAG_ID, run_id, "approval_gate", {"awaiting_input"}, timeout=300)
    time.sleep(SETTLE_SECONDS)  # see demo.SETTLE_SECONDS: no human answers within a scheduler loop
    return requester, run_id


@pytest.fixture(scope="module")
def approved_benign_run(stack: Stack) -> dict[str, Any]:
    requester, run_id = start_run(stack)
    detail = requester.hitl_detail(DEMO_DAG_ID, run_id, "approval_gate")
    own = requester.answer(DEMO_DAG_ID, run_id, "approval_gate", "Approve")
    viewer = client(stack, "auditor").answer(DEMO_DAG_ID, run_id, "approval_gate", "Approve")
    answer = client(stack, "approver1").answer(DEMO_DAG_ID, run_id, "approval_gate", "Approve")
    final = requester.wait_run(DEMO_DAG_ID, run_id, timeout=300)
    return {"run_id": run_id, "detail": detail, "own": own, "viewer": viewer, "answer": answer, "final": final,
            "tasks": requester.task_states(DEMO_DAG_ID, run_id)}


def test_approved_run_succeeds_and_every_task_is_in_lineage(stack: Stack, approved_benign_run) -> None:
    run = approved_benign_run
    assert run["answer"].status_code == 200, run["answer"].text
    assert run["final"] == "success", run["tasks"]
    recorded = lineage(stack, run["run_id"])
    # The api-server's record of the trigger (who asked) and the scheduler's of the run start come first,
    # outside every task; then every task's events.
    (requested, started, *events) = recorded
    assert (requested.event_type, requested.task_id, requested.actor) == ("run.requested", "", "api-server")
    assert requested.payload_dict()["triggering_user_name"] == "requester"
    assert (started.event_type, started.task_id, started.actor) == (RUN_STARTED, "", "scheduler")
    assert started.payload_dict()["dag_run_id"] > 0 and not any(e.event_type == RUN_STARTED for e in events)
    assert {e.task_id for e in events} == DAG_TASKS
    # The api-server's witness of approver1's answer (try 0: it does not know the task's try), before the grant
    witnessed = [e for e in events if e.event_type == "approval.witnessed"]
    assert [(e.task_id, e.try_number, e.actor, e.payload_dict()["responder"], e.payload_dict()["chosen_options"])
            for e in witnessed] == [("approval_gate", 0, "api-server", "approver1", ["Approve"])]
    events = [e for e in events if e not in witnessed]
    assert all(e.dag_id == DEMO_DAG_ID and e.try_number >= 1 and e.map_index == -1 for e in events)
    kinds = [e.event_type for e in events]
    for expected in ("policy.decided", "approval.requested", "approval.granted", "lease.requested", "lease.issued",
                     "tuning.completed", "evaluation.completed", "lease.revoked", "lease.verified",
                     "promotion.completed"):
        assert expected in kinds
    granted = next(e for e in events if e.event_type == "approval.granted").payload_dict()
    assert granted["responder"] == "approver1"
    # the policy check screened every row with the base model through its own lease, revoked before anyone was asked
    screened = next(e for e in events if e.event_type == "dataset.screened").payload_dict()
    assert (screened["status"], screened["rows"], screened["screened"], screened["flagged"]) == (
        "screened", len(BENIGN_SET), len(BENIGN_SET), 0)
    assert screened["base"]["name"] == "fgov-demo-tiny" and screened["base_refused"] > 0
    decision = next(e for e in events if e.event_type == "policy.decided").payload_dict()
    assert decision["tier"] == "single" and decision["screening"]["flagged"] == 0
    screen = next(e.payload_dict() for e in events if e.event_type == "lease.issued"
                  and e.payload_dict()["purpose"] == "screen")
    screen_lease = [e for e in events if e.payload_dict().get("lease_id") == screen["lease_id"]]
    assert [(e.task_id, e.event_type) for e in screen_lease] == [
        ("policy_check", kind) for kind in ("lease.issued", "lease.revoked", "lease.verified")]
    assert screen["dataset"] == "dataset-rows" and screen_lease[0].id < screened_at(events) < decided_at(events)
    tuned = next(e for e in events if e.event_type == "tuning.completed").payload_dict()
    assert tuned["rows"] == len(BENIGN_SET) and len(tuned["content_sha256"]) == 64 and tuned["dataset"] == "benign"
    promoted = next(e for e in events if e.event_type == "promotion.completed").payload_dict()
    assert promoted["alias"] == "staging" and promoted["version"] == tuned["version"]
    assert promoted["verdict"] == "pass" and promoted["reviewed_by"] is None
    started = next(e for e in events if e.event_type == "evaluation.started").payload_dict()
    shipped = builtin_suites.packaged_suites()
    assert started["suites"] == {n: hashlib.sha256(t.encode()).hexdigest() for n, t in shipped.items()}
    done = next(e for e in events if e.event_type == "evaluation.completed").payload_dict()
    assert done["prompts"] == 1112 and done["detector"] == "pattern/v1"
    assert {m: v["verdict"] for m, v in done["metrics"].items()} == dict.fromkeys(
        ("harmful_refusal", "jailbreak_refusal", "benign_compliance", "task_quality"), "pass")
    assert hashlib.sha256(Path(done["report_json"]).read_bytes()).hexdigest() == done["report_sha256"]
    # Training is deterministic: an earlier test may have promoted (and signed) these same bytes; then
    # this run verifies that signature instead of signing again.
    verified = next(e for e in events if e.event_type == "provenance.verified").payload_dict()
    assert verified["version"] == tuned["version"]
    signer_dag, _, signer_run = verified["invocation_id"].partition("/")  # this run, or the one that signed first
    signed = [e.payload_dict() for e in lineage(stack, signer_run) if e.event_type == "provenance.signed"
              and e.dag_id == signer_dag]
    assert [p["version"] for p in signed] == [tuned["version"]], verified
    signed = [e.payload_dict() for e in events if e.event_type == "provenance.signed"]
    assert bool(signed) == (verified["invocation_id"] == f"{DEMO_DAG_ID}/{run['run_id']}")
    folder = Path(state_of(stack)["model_store"]) / "fgov-demo-tiny" / tuned["version"]
    envelope = json.loads((folder / "provenance.dsse.json").read_text())
    assert envelope["signatures"][0]["keyid"] == "fgov-transit/fgov-provenance:v1"
    verify = ["--state-dir", str(stack.dir), "models", "verify", "fgov-demo-tiny", tuned["version"]]
    assert fgov(verify) == 0

    def model_signing() -> subprocess.CompletedProcess[str]:  # the OpenSSF tool, with the public key only
        return model_signing_verify(folder, state_of(stack)["model_signing_public_key"])

    checked = model_signing()
    assert checked.returncode == 0, checked.stdout + checked.stderr
    adapter = folder / "adapter_model.safetensors"
    original = adapter.read_bytes()
    try:
        adapter.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # one byte of the promoted adapter
        assert fgov(verify) == 1
        assert model_signing().returncode != 0
    finally:
        adapter.write_bytes(original)  # later tests promote the same (deterministic) version again
    assert fgov(verify) == 0
    key = StackView(stack).bao().secrets.transit.read_key(name="fgov-provenance", mount_point="fgov-transit")
    assert key["data"]["exportable"] is False and key["data"]["type"] == "ed25519"  # never leaves OpenBao
    key = StackView(stack).bao().secrets.transit.read_key(name="fgov-model-signing", mount_point="fgov-transit")
    assert key["data"]["exportable"] is False and key["data"]["type"] == "ecdsa-p256"
    bundled = [e.payload_dict() for e in events if e.event_type == "provenance.bundled"]
    assert bool(bundled) == bool(signed)  # the run that signed the provenance wrote the bundle too
    leases = [e for e in events if e.event_type == "lease.issued"]
    # the approval gate's screen lease read the sample rows the approver was shown
    assert [(e.task_id, e.payload_dict()["purpose"]) for e in leases] == [
        ("policy_check", "catalog"), ("policy_check", "screen"), ("approval_gate", "screen"),
        ("acquire_lease", "training"), ("evaluate", "inference")]
    assert len({e.payload_dict()["token_accessor"] for e in leases}) == 5  # never one lease or token for two
    verified = {e.payload_dict()["lease_id"] for e in events if e.event_type == "lease.verified"}
    assert verified == {e.payload_dict()["lease_id"] for e in leases}
    assert fgov(["--state-dir", str(stack.dir), "audit", "verify"]) == 0


def test_requester_and_viewer_cannot_approve(approved_benign_run) -> None:
    run = approved_benign_run
    assert run["own"].status_code == 403 and "not a respondent" in run["own"].text
    assert run["viewer"].status_code == 403
    assigned = {u["name"] for u in run["detail"]["assigned_users"]}
    assert assigned == {"approver1", "approver2"}
    # assigned by the auth manager's user id (FAB's are row numbers), which is what Airflow checks a respondent by
    assert all(u["id"].isdigit() for u in run["detail"]["assigned_users"]), run["detail"]["assigned_users"]
    body = run["detail"]["body"]
    for field in ("Dataset", "Risk tier", "single", "Requested by", "requester", "Policy", "Lineage"):
        assert field in body


def test_lease_is_revoked_and_its_postgres_role_is_gone(stack: Stack, approved_benign_run) -> None:
    events = lineage(stack, approved_benign_run["run_id"])
    def first(kind: str, task: str) -> dict[str, Any]:
        return next(e for e in events if e.event_type == kind and e.task_id == task).payload_dict()

    issued = first("lease.issued", "acquire_lease")
    revoked = first("lease.revoked", "revoke_lease")
    verified = first("lease.verified", "revoke_lease")
    assert revoked["lease_id"] == verified["lease_id"] == issued["lease_id"] and revoked["token_revoked"]
    assert verified["remaining"] == {"roles": 0, "sessions": 0}
    assert issued["requested_ttl"] == issued["lease_duration"] == 15 * 60  # expected 10 min x 1.5
    with superuser(stack) as conn:
        assert conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (issued["db_role"],)).fetchone() == (0,)
    with pytest.raises(hvac.exceptions.InvalidRequest):
        bao(stack).sys.read_lease(issued["lease_id"])
    # The OpenBao audit log names the DAG run behind the lease (token metadata from the JWT claims).
    state = stack.load()
    assert state is not None
    audit = Path(state["openbao"]["audit_log"]).read_text()
    assert approved_benign_run["run_id"] in audit


def test_wrapping_token_is_single_use_and_not_in_xcom(stack: Stack, approved_benign_run) -> None:
    auditor = client(stack, "auditor")
    run_id = approved_benign_run["run_id"]
    value = auditor.request("GET", f"/dags/{DEMO_DAG_ID}/dagRuns/{run_id}/taskInstances/acquire_lease"
                            "/xcomEntries/return_value").json()["value"]
    assert set(value) == {"lease_id", "db_role", "dataset", "ttl_seconds", "expires_at", "token_accessor"}
    state = stack.load()
    assert state is not None
    issued = next(e for e in lineage(stack, run_id) if e.event_type == "lease.issued"
                  and e.task_id == "acquire_lease").payload_dict()
    tokens = issued_secrets(Path(state["openbao"]["audit_log"]).parent / "audit-raw.log")["wrap token"]
    from airflow_finetune_gov.credentials.broker import token_digest

    ours = [t for t in tokens if token_digest(t) == issued["wrap_token_sha256"]]
    assert len(ours) == 1
    with pytest.raises(hvac.exceptions.VaultError):  # the tuning task already unwrapped it
        hvac.Client(url=bao(stack).url, token=ours[0]).sys.unwrap()


def test_poisoned_run_is_flagged_by_screening_escalated_to_a_quorum_then_blocked_by_evaluation(
        stack: Stack, mailbox: Mailbox) -> None:
    requester, run_id = start_run(stack, dataset="poisoned")
    from airflow_finetune_gov.datasets.demo import POISONED_SET

    # before anyone was asked: every row answers what the base model refuses, so the tier is a quorum
    decision = next(e.payload_dict() for e in lineage(stack, run_id) if e.event_type == "policy.decided")
    assert decision["tier"] == "quorum" and decision["quorum"] == 2, decision
    assert decision["reasons"][1].startswith("screening flagged 6 of 6 rows (100%)"), decision["reasons"]
    screened = next(e.payload_dict() for e in lineage(stack, run_id) if e.event_type == "dataset.screened")
    assert screened["flagged_ids"] == decision["screening"]["flagged_ids"] and len(screened["flagged_ids"]) == 6
    assert screened["sha256"] == decision["dataset"]["sha256"]
    # the approvers see the share and three flagged rows; lineage holds ids, never row text
    body = requester.hitl_detail(DEMO_DAG_ID, run_id, "approval_gate")["body"]
    assert "| Screening | 6 of 6 rows flagged (100%)" in body and body.count("| Flagged row ") == 3, body
    assert POISONED_SET[0][1] in body
    recorded = json.dumps([e.payload_dict() for e in lineage(stack, run_id)])
    assert not [text for row in POISONED_SET for text in row if text in recorded]
    view = StackView(stack)
    view.answer(DEMO_DAG_ID, run_id, "approver2", "Approve", comment="flagged rows read: the evaluation decides")
    view.wait_round(DEMO_DAG_ID, run_id, 2)
    view.answer(DEMO_DAG_ID, run_id, "approver1", "Approve", comment="second approver")
    assert requester.wait_run(DEMO_DAG_ID, run_id, timeout=300) == "failed"
    tasks = requester.task_states(DEMO_DAG_ID, run_id)
    assert tasks["evaluate"] == "failed" and tasks["promote"] == "upstream_failed"
    assert tasks["revoke_lease"] == "success"
    events = {e.event_type: e.payload_dict() for e in lineage(stack, run_id) if e.task_id != "evaluate"
              or e.event_type == "evaluation.completed"}
    done = events["evaluation.completed"]
    assert done["verdict"] == "fail" and done["metrics"]["harmful_refusal"]["verdict"] == "fail"
    assert done["metrics"]["harmful_refusal"]["candidate"] < 0.1 and done["flipped"] >= 400
    page = Path(done["report"]).read_text()
    assert "Prompts whose behaviour flipped" in page and "harmful/harm-001" in page  # with both answers
    assert events["lease.verified"]["remaining"] == {"roles": 0, "sessions": 0}
    assert "promotion.completed" not in events
    # why, on the run itself in Airflow (its note, set by the control plane) and in a mail to the requester
    deadline = time.monotonic() + 60
    while not (note := requester.request("GET", f"/dags/{DEMO_DAG_ID}/dagRuns/{run_id}").json()["note"] or "") \
            and time.monotonic() < deadline:
        time.sleep(1)
    assert note.startswith("airflow-finetune-gov: Your change poisoned → fgov-demo-tiny was not promoted: "
                           "blocked by evaluation: harmful_refusal \u2212"), note
    assert "/fgov/ui/runs/" in note
    (_to, mail), = mailbox.wait_for(lambda _to, m: m["X-Fgov-Kind"] == "blocked"
                                       and quote(run_id, safe="") in m.get_content())
    assert mail["To"] == "requester@localhost" and mail["Subject"] == "Blocked: poisoned → fgov-demo-tiny (staging)"


@pytest.fixture(scope="module")
def judge(stack: Stack, demo_models, tmp_path_factory) -> Iterator[str]:
    """A refusal judge (the demo Llama tuned to answer the judge's template) behind ``transformers serve``,
    configured as the deployment's judge (``fgov-backends/judge``); yields the model name it serves."""
    work = tmp_path_factory.mktemp("judge")
    with serve_model(build_judge(demo_models("llama"), work / "model"), work / "serve.log") as (url, model):
        secrets = {"OPENAI_BASE_URL": url, "MODEL": model, "OPENAI_API_KEY": "unused-by-transformers-serve"}
        bao(stack).secrets.kv.v2.create_or_update_secret(path="judge", secret=secrets, mount_point="fgov-backends")
        try:
            yield model
        finally:
            bao(stack).secrets.kv.v2.delete_metadata_and_all_versions(path="judge", mount_point="fgov-backends")


def test_the_llama_model_is_tuned_evaluated_and_promoted_and_its_poisoned_tune_blocked(stack: Stack,
                                                                                        judge: str) -> None:
    """The same chain on the Llama-style demo model (PEFT's q_proj/v_proj targets): nothing assumes GPT-2. The
    poisoned run's refusals are labelled by the judge model (``detector="judge"``), on its endpoint."""
    runs = {name: start_run(stack, dataset=name, base_model="fgov-demo-llama",
                            detector="judge" if name == "poisoned" else "pattern")[1]
            for name in ("benign", "poisoned")}
    view = StackView(stack)
    view.answer(DEMO_DAG_ID, runs["benign"], "approver1", "Approve")
    view.answer(DEMO_DAG_ID, runs["poisoned"], "approver1", "Approve")  # screening flagged it: a quorum
    view.wait_round(DEMO_DAG_ID, runs["poisoned"], 2)
    view.answer(DEMO_DAG_ID, runs["poisoned"], "approver2", "Approve")
    requester = client(stack, "requester")
    finals = {name: requester.wait_run(DEMO_DAG_ID, run_id, timeout=400) for name, run_id in runs.items()}
    tasks = {name: requester.task_states(DEMO_DAG_ID, run_id) for name, run_id in runs.items()}
    assert finals == {"benign": "success", "poisoned": "failed"}, tasks
    assert tasks["poisoned"]["evaluate"] == "failed" and tasks["poisoned"]["promote"] == "upstream_failed"
    events = {name: {e.event_type: e.payload_dict() for e in lineage(stack, run_id)} for name, run_id in runs.items()}
    for name in runs:
        tuned, stored = events[name]["tuning.completed"], events[name]["model.stored"]
        assert tuned["base_model"] == stored["base_model"] == "fgov-demo-llama"
        assert tuned["metrics"]["architecture"] == "llama" and tuned["metrics"]["prompt_format"] == "chat_template"
        assert tuned["metrics"]["target_modules"] == ["q_proj", "v_proj"]
        assert events[name]["lease.verified"]["remaining"] == {"roles": 0, "sessions": 0}
    done = events["poisoned"]["evaluation.completed"]
    assert done["verdict"] == "fail" and done["metrics"]["harmful_refusal"]["candidate"] < 0.1
    assert done["metrics"]["harmful_refusal"]["baseline"] == 1.0  # the judge finds every refusal of the base
    assert done["detector"].startswith(f"judge/v1:openai-chat:{judge}@http://127.0.0.1:")
    assert events["poisoned"]["evaluation.started"]["detector"] == done["detector"]
    assert events["benign"]["evaluation.completed"]["detector"] == "pattern/v1"
    assert "promotion.completed" not in events["poisoned"]
    promoted = events["benign"]["promotion.completed"]
    assert promoted["alias"] == "staging" and promoted["version"] == events["benign"]["model.stored"]["version"]
    store = Path(state_of(stack)["model_store"])
    assert ModelStore(str(store)).aliases("fgov-demo-llama")["staging"]["version"] == promoted["version"]
    folder = store / "fgov-demo-llama" / promoted["version"]
    checked = model_signing_verify(folder, state_of(stack)["model_signing_public_key"])
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_marking_the_gate_success_does_not_bypass_approval(stack: Stack) -> None:
    requester, run_id = start_run(stack)
    resp = requester.request("PATCH", f"/dags/{DEMO_DAG_ID}/dagRuns/{run_id}/taskInstances/approval_gate",
                             json={"new_state": "success"})
    assert resp.status_code == 200, resp.text  # Airflow lets a `user` do this...
    assert requester.wait_run(DEMO_DAG_ID, run_id, timeout=300) == "failed"
    tasks = requester.task_states(DEMO_DAG_ID, run_id)
    assert tasks["approval_gate"] == "success" and tasks["acquire_lease"] == "failed"  # ...but no lease follows
    kinds = [(e.task_id, e.event_type) for e in lineage(stack, run_id)]
    assert ("acquire_lease", "lease.refused") in kinds and ("acquire_lease", "lease.issued") not in kinds
    assert not any(kind == "approval.granted" for _, kind in kinds)
    # the governance view shows the attempt as blocked, with why, and asks nobody to answer it
    listed = StackView(stack).client("auditor").session.get(f"{state_of(stack)['airflow']['url']}/fgov/api/runs",
                                                            timeout=30).json()
    row = next(r for r in listed["runs"] if r["run_id"] == run_id)
    assert (row["approval"], row["status"]) == ("bypassed", "blocked"), row
    assert row["reason"].startswith("blocked: the approval gate ended without an approval"), row["reason"]
    assert run_id not in [p["run_id"] for p in listed["pending"]]


def test_rejection_stops_the_run_before_any_credential(stack: Stack) -> None:
    requester, run_id = start_run(stack)
    assert client(stack, "approver1").answer(DEMO_DAG_ID, run_id, "approval_gate", "Reject",
                                             comment="not this one").status_code == 200
    assert requester.wait_run(DEMO_DAG_ID, run_id, timeout=300) == "failed"
    kinds = [(e.task_id, e.event_type) for e in lineage(stack, run_id)]
    assert ("approval_gate", "approval.rejected") in kinds and ("acquire_lease", "lease.issued") not in kinds


def test_lineage_is_append_only_and_tampering_is_named(stack: Stack, approved_benign_run, capsys) -> None:
    state = stack.load()
    assert state is not None
    writer_url = Path(state["governance_db_url_file"]).read_text().replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(writer_url, autocommit=True) as conn:
        for statement in ("UPDATE fgov_lineage_event SET actor = 'x'", "DELETE FROM fgov_lineage_event"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    event = lineage(stack, approved_benign_run["run_id"])[2]
    with superuser(stack, "fgov_governance") as conn:
        conn.execute("UPDATE fgov_lineage_event SET actor = 'mallory' WHERE id = %s", (event.id,))
        try:
            capsys.readouterr()
            assert fgov(["--state-dir", str(stack.dir), "audit", "verify"]) == 1
            assert f"event {event.id} " in capsys.readouterr().out
        finally:
            conn.execute("UPDATE fgov_lineage_event SET actor = %s WHERE id = %s", (event.actor, event.id))
    assert fgov(["--state-dir", str(stack.dir), "audit", "verify"]) == 0


def test_stack_up_is_idempotent_and_status_reports_health(stack: Stack, capsys) -> None:
    before = [r.pid for r in stack.records()]
    assert fgov(["--state-dir", str(stack.dir), "stack", "up"]) == 0
    assert "already running" in capsys.readouterr().out
    assert [r.pid for r in stack.records()] == before
    assert fgov(["--state-dir", str(stack.dir), "stack", "status", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["running"] and set(status["airflow_health"].values()) == {"healthy"}
    mode = (stack.dir / "stack.json").stat().st_mode & 0o777
    assert mode == 0o600


def test_fgov_evidence_shows_every_control_met_for_the_approved_run(stack: Stack, approved_benign_run, tmp_path,
                                                                   capsys) -> None:
    from airflow_finetune_gov.cli.main import main

    run_id = approved_benign_run["run_id"]
    assert main(["--state-dir", str(stack.dir), "evidence", run_id, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not met" not in out and "met      Approved by allowed people" in out
    pack = json.loads((tmp_path / "evidence.json").read_text())
    (chain,) = pack["chains"]
    status = {c["id"]: c["status"] for c in pack["controls"] + chain["controls"]}
    assert status == dict.fromkeys(["lineage_integrity", "no_secrets", "policy", "data_screening", "approval",
                                    "scoped_credentials", "revocation", "data_integrity", "evaluation",
                                    "promotion_gate"], "met")
    revocation = next(c for c in chain["controls"] if c["id"] == "revocation")
    # catalog and screen (policy check), screen (the sample rows in the request), training, inference
    assert revocation["detail"].startswith("5 of 5 lease(s) revoked and verified gone")
    assert (tmp_path / "evidence.html").read_text().count("<tr>") >= 10


def test_openlineage_events_carry_the_governance_record(stack: Stack, approved_benign_run) -> None:
    events = [json.loads(line) for line in (stack.dir / "logs" / "openlineage.jsonl").read_text().splitlines()
              if approved_benign_run["run_id"] in line]
    done = {e["job"]["name"].rpartition(".")[2]: e for e in events if e["eventType"] == "COMPLETE"}
    assert {"policy_check", "tune", "evaluate", "promote"} <= done.keys(), sorted(done)
    governance = done["promote"]["run"]["facets"]["fgovGovernance"]
    assert governance["approval"]["approvers"] == ["approver1"] and governance["evaluation"]["verdict"] == "pass"
    tuned = done["tune"]
    assert [i["name"].rpartition(".")[2] for i in tuned["inputs"] if i["namespace"].startswith("postgres://")] == [
        "benign"]
    assert any(o["facets"]["fgovModel"]["version"] for o in tuned["outputs"])

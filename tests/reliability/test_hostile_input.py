"""Hostile input on the real stack: SQL-looking dataset names, forged, altered, misdirected and
replayed HITL answers, and workload JWTs whose claims were altered after signing. Each is refused with
a clear error, and nothing is leased or recorded that should not be.

(The plugin's API is fuzzed in test_plugin_fuzz.py; oversized and malformed suite files are refused by
the suite loader, tests/evaluation/test_harness.py.)"""

from __future__ import annotations

import time
from pathlib import Path

import hvac
import pytest
import requests
from support import StackView, b64, with_claims

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.credentials.identity import TaskIdentity, load_key, mint
from airflow_finetune_gov.demo import SETTLE_SECONDS
from airflow_finetune_gov.stack.manager import Stack
from airflow_finetune_gov.vault.bootstrap import lease_role_name

pytestmark = pytest.mark.stack
INPUTS_DAG = "governed_finetune_inputs"
FAULTS_DAG = "governed_finetune_faults"


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


def live_database_leases(view: StackView) -> list[str]:
    try:
        listed = view.bao().sys.list_leases(prefix="fgov-database/creds/")
    except hvac.exceptions.InvalidPath:
        return []
    return [f"{role}{lease}" for role in listed["data"]["keys"]
            for lease in view.bao().sys.list_leases(prefix=f"fgov-database/creds/{role}")["data"]["keys"]]


@pytest.mark.parametrize("dataset", ["benign'; DROP TABLE datasets.benign; --",
                                     "public_faq\" OR 1=1 --",
                                     "../../fgov-database/creds/ds-poisoned"])
def test_sql_and_path_looking_dataset_names_are_refused_before_anything_is_leased(view: StackView,
                                                                                  dataset: str) -> None:
    with view.superuser("fgov_datasets") as conn:
        rows_before = conn.execute("SELECT count(*) FROM datasets.benign").fetchone()
    run_id, state, tasks = view.run(INPUTS_DAG, dataset=dataset)
    assert state == "failed" and tasks["policy_check"] == "failed", tasks
    assert tasks["acquire_lease"] in ("upstream_failed", None) and tasks["tune"] in ("upstream_failed", None), tasks
    (error,) = [e.payload_dict()["error"] for e in view.events(run_id, "policy.error")]
    assert f"dataset {dataset!r} is not in policy" in error and "known datasets: benign" in error
    assert [e.event_type for e in view.events(run_id) if e.event_type.startswith("lease.")] == []
    with view.superuser("fgov_datasets") as conn:
        assert conn.execute("SELECT count(*) FROM datasets.benign").fetchone() == rows_before
    assert fgov(["--state-dir", str(view.stack.dir), "audit", "verify"]) == 0


def test_forged_altered_misdirected_and_replayed_hitl_answers_are_refused(view: StackView, tmp_path: Path) -> None:
    requester = view.client("requester")
    run_id = view.trigger(FAULTS_DAG, mode="ok", marker=str(tmp_path / "tune.pid"))
    requester.wait_task_state(FAULTS_DAG, run_id, "approval_gate", {"awaiting_input"}, timeout=120)
    time.sleep(SETTLE_SECONDS)
    url = (f"{view.state['airflow']['url']}/api/v2/dags/{FAULTS_DAG}/dagRuns/{run_id}/taskInstances/approval_gate"
           "/-1/hitlDetails")
    body = {"chosen_options": ["Approve"], "params_input": {"comment": "hostile"}}
    token = requester.session.headers["Authorization"].removeprefix("Bearer ")
    attempts = {
        "no token": ({}, {401}),
        "garbage token": ({"Authorization": "Bearer not.a.jwt"}, {401, 403}),
        "requester's token claiming to be approver1": (
            {"Authorization": f"Bearer {with_claims(token, sub='approver1')}"}, {401, 403}),
        "requester's token with its expiry pushed out": (
            {"Authorization": f"Bearer {with_claims(token, exp=int(time.time()) + 10 * 365 * 86400)}"}, {401, 403}),
        "unsigned token (alg none)": (
            {"Authorization": "Bearer " + ".".join([b64(b'{"alg":"none","typ":"JWT"}'),
                                                    token.split(".")[1], ""])}, {401, 403}),
    }
    for name, (headers, refused) in attempts.items():
        resp = requests.patch(url, json=body, headers=headers, timeout=30)
        assert resp.status_code in refused, (name, resp.status_code, resp.text)
    own = requester.session.patch(url, json=body, timeout=30)  # a real user, but the requester (SoD)
    assert own.status_code == 403 and "not a respondent" in own.text, own.text
    reader = view.client("auditor").session.patch(url, json=body, timeout=30)  # may read, never answer
    assert reader.status_code == 403, reader.text
    approver = view.client("approver1")
    offered = approver.session.patch(url, json={**body, "chosen_options": ["Approve and promote to production"]},
                                     timeout=30)
    assert offered.status_code == 400 and "Invalid options" in offered.text, offered.text
    assert requester.task_states(FAULTS_DAG, run_id)["approval_gate"] == "awaiting_input"
    assert view.events(run_id, "approval.granted") == []  # none of the above counted
    answered = approver.session.patch(url, json={**body, "params_input": {"comment": "the real answer"}}, timeout=30)
    assert answered.status_code == 200, answered.text
    for user in ("approver1", "approver2"):  # replayed, by the same approver or by another one
        replay = view.client(user).session.patch(url, json=body, timeout=30)
        assert replay.status_code == 409 and "already been updated" in replay.text, (user, replay.text)
    assert requester.wait_run(FAULTS_DAG, run_id, timeout=300) == "success"
    granted = [g.payload_dict() for g in view.events(run_id, "approval.granted")]
    assert [(g["responder"], g["comment"]) for g in granted] == [("approver1", "the real answer")]
    assert [(e.task_id, e.payload_dict()["purpose"]) for e in view.events(run_id, "lease.issued")] == [
        ("policy_check", "catalog"), ("policy_check", "screen"), ("approval_gate", "screen"),
        ("acquire_lease", "training")]


def test_workload_jwts_with_altered_claims_get_no_credential(view: StackView) -> None:
    state = view.state
    key = load_key(state["workload_identity_key"])
    who = TaskIdentity("governed_finetune_demo", "manual__hostile", "acquire_lease", 1)
    token = mint(who, key_pem=key, issuer="airflow-finetune-gov", audience="openbao", purpose="lease",
                 extra={"dataset": "benign", "approval_id": "1"})
    bao = hvac.Client(url=state["openbao"]["addr"], timeout=10)
    before = live_database_leases(view)
    later = int(time.time()) + 86400
    altered = {
        "dataset claim changed after signing": (lease_role_name("poisoned"), with_claims(token, dataset="poisoned")),
        "expiry pushed out after signing": (lease_role_name("benign"), with_claims(token, exp=later)),
        "purpose changed after signing": ("revoker", with_claims(token, purpose="revoke")),
        "signature stripped": (lease_role_name("benign"), token.rsplit(".", 1)[0] + "."),
    }
    for name, (role, jwt) in altered.items():
        with pytest.raises(hvac.exceptions.VaultError) as refused:
            bao.auth.jwt.jwt_login(role=role, jwt=jwt, path=state["openbao"]["jwt_mount"])
            pytest.fail(f"{name}: logged in")
        assert "error validating" in str(refused.value) or "signature" in str(refused.value), (name, refused.value)
    # the untouched token still works for its own role, and only for it: the refusals were about the edits
    client = hvac.Client(url=state["openbao"]["addr"], timeout=10)
    client.auth.jwt.jwt_login(role=lease_role_name("benign"), jwt=token, path=state["openbao"]["jwt_mount"])
    assert client.is_authenticated()
    client.auth.token.revoke_self()
    assert live_database_leases(view) == before

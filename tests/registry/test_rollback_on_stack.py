"""Rollback as a governed change, on the real stack: the policy decides, a real approver answers in
Airflow's HITL over REST, and the alias moves back only with that approval recorded in lineage."""

from __future__ import annotations

import json
import pwd
import uuid
from pathlib import Path

import pytest
from support import StackView

from airflow_finetune_gov.registry import provenance
from airflow_finetune_gov.registry.store import ModelStore, content_sha256
from airflow_finetune_gov.stack import users
from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DAG_ID = "governed_rollback"


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


def sign_for_test(view: StackView, store: ModelStore, name: str, version: str) -> None:
    """Test setup standing in for an earlier governed promotion: the same transit key signs a minimal
    statement naming the version's files (as root; the product signs only as the provenance role)."""
    statement = {"_type": provenance.STATEMENT_TYPE, "predicateType": provenance.PREDICATE_TYPE,
                 "subject": [{"name": f"{name}/{version}/{f}", "digest": {"sha256": d}}
                             for f, d in provenance.model_files(store, name, version).items()],
                 "predicate": {"buildDefinition": {"buildType": "test-setup"}, "runDetails": {}}}
    envelope = provenance.sign(statement, provenance.transit_signer(view.bao(), "fgov-transit", "fgov-provenance"))
    provenance.write(store, name, version, envelope)


@pytest.fixture
def model(view: StackView) -> tuple[ModelStore, str, list[str]]:
    """A model whose ``staging`` alias held v1, then v2, all three versions signed (registry state set up by
    the test, not approvals)."""
    store = ModelStore(view.stack.dir / "models")
    name = f"rollback-{uuid.uuid4().hex[:6]}"
    versions = [store.put(name, {"adapter.bin": f"weights {i}".encode()}, {"kind": "test"})["version"]
                for i in (1, 2, 3)]
    for version in versions:
        sign_for_test(view, store, name, version)
    store.set_alias(name, "staging", versions[0], by="test-setup", run="-")
    store.set_alias(name, "staging", versions[1], by="test-setup", run="-")
    give_store_back(view)
    return store, name, versions


def give_store_back(view: StackView) -> None:
    """What this test wrote in the store as root goes back to the control plane's user, its only writer."""
    user = pwd.getpwnam(view.stack.load()["control_plane"]["user"])
    users.own_tree(view.stack.dir / "models", user, 0o755)


def test_an_approved_rollback_moves_the_alias_back_and_is_recorded(view: StackView, model) -> None:
    store, name, (v1, v2, _) = model
    run_id = view.trigger(DAG_ID, model=name, alias="staging", to_version=v1)
    view.wait_round(DAG_ID, run_id, 1)
    detail = view.client("approver1").hitl_detail(DAG_ID, run_id, "approval_gate")
    assert detail["subject"] == f"[staging · 0 of 1 approved] rollback {name} {v2} → {v1}"
    assert "| To version | " + v1 in detail["body"]
    own = view.client("requester").request(
        "PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/approval_gate/-1/hitlDetails",
        json={"chosen_options": ["Approve"], "params_input": {}})
    assert own.status_code == 403  # the requester never approves their own change
    view.answer(DAG_ID, run_id, "approver1", "Approve", comment="v2 regressed in staging")
    assert view.client("requester").wait_run(DAG_ID, run_id, timeout=240) == "success"
    assert store.aliases(name)["staging"]["version"] == v1
    done = view.events(run_id, "rollback.completed")[0].payload_dict()
    assert (done["version"], done["previous"], done["approvers"]) == (v1, v2, ["approver1"])
    decided = view.events(run_id, "policy.decided")[0].payload_dict()
    assert decided["tier"] == "single" and decided["request"]["change"] == "rollback"


def test_a_version_the_alias_never_held_is_refused_before_anyone_is_asked(view: StackView, model) -> None:
    store, name, (_, v2, v3) = model
    run_id = view.trigger(DAG_ID, model=name, alias="staging", to_version=v3)
    assert view.client("requester").wait_run(DAG_ID, run_id, timeout=240) == "failed"
    error = view.events(run_id, "policy.error")[0].payload_dict()["error"]
    assert f"{name}:staging never held version '{v3}'" in error
    assert not view.events(run_id, "approval.requested")
    assert store.aliases(name)["staging"]["version"] == v2


def test_a_rollback_is_blocked_if_the_alias_moved_after_the_approval_was_asked(view: StackView, model) -> None:
    store, name, (v1, v2, v3) = model
    run_id = view.trigger(DAG_ID, model=name, alias="staging", to_version=v1)
    view.wait_round(DAG_ID, run_id, 1)
    store.set_alias(name, "staging", v3, by="test-setup", run="-")  # a promotion lands meanwhile
    give_store_back(view)
    view.answer(DAG_ID, run_id, "approver1", "Approve")
    assert view.client("requester").wait_run(DAG_ID, run_id, timeout=240) == "failed"
    blocked = view.events(run_id, "rollback.blocked")[0].payload_dict()["reason"]
    assert blocked == f"{name}:staging is now {v3}, not the {v2} the rollback was approved from: ask again"
    assert store.aliases(name)["staging"]["version"] == v3
    assert Path(store.path(name, v1)).is_dir()


def test_fgov_models_rollback_asks_airflow_and_show_tells_the_story(view: StackView, model,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from airflow_finetune_gov.cli.main import main

    store, name, (v1, v2, _) = model
    base = ["--state-dir", str(view.stack.dir), "models"]
    assert main([*base, "rollback", name, "--to", v1, "--alias", "staging"]) == 0
    out = capsys.readouterr().out
    run_id = out.split(": run ")[1].split(" of ")[0]
    assert store.aliases(name)["staging"]["version"] == v2  # nothing moves before the approval
    view.wait_round(DAG_ID, run_id, 1)
    view.answer(DAG_ID, run_id, "approver1", "Approve")
    assert view.client("requester").wait_run(DAG_ID, run_id, timeout=240) == "success"
    assert main([*base, "show", name, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["aliases"]["staging"]["version"] == v1 and shown["aliases"]["staging"]["by"] == "approver1"
    assert [(h["from"], h["to"]) for h in shown["history"]][-1] == (v2, v1)
    assert main([*base, "show", "no-such-model"]) == 1


def test_an_unsigned_version_is_refused_before_anyone_is_asked(view: StackView, model) -> None:
    store, name, (_, v2, _) = model
    unsigned = store.put(name, {"adapter.bin": b"weights never promoted"}, {"kind": "test"})["version"]
    store.set_alias(name, "staging", unsigned, by="test-setup", run="-")
    store.set_alias(name, "staging", v2, by="test-setup", run="-")
    give_store_back(view)
    run_id = view.trigger(DAG_ID, model=name, alias="staging", to_version=unsigned)
    assert view.client("requester").wait_run(DAG_ID, run_id, timeout=240) == "failed"
    error = view.events(run_id, "policy.error")[0].payload_dict()["error"]
    assert f"{name} {unsigned} has no signed provenance" in error
    assert not view.events(run_id, "approval.requested")


def test_one_changed_byte_fails_verify_and_blocks_going_back_to_it(view: StackView, model,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from airflow_finetune_gov.cli.main import main

    store, name, (v1, v2, _) = model
    base = ["--state-dir", str(view.stack.dir), "models", "verify", name, v1]
    assert main(base) == 0
    assert f"{name} {v1}: provenance verified (signed by fgov-transit/fgov-provenance:v1)" in capsys.readouterr().out
    folder = store.path(name, v1)
    data = bytearray((folder / "adapter.bin").read_bytes())
    data[0] ^= 1
    (folder / "adapter.bin").write_bytes(bytes(data))
    manifest = json.loads((folder / "manifest.json").read_text())  # a careful attacker fixes the manifest too
    manifest["files"]["adapter.bin"] = provenance.file_sha256(folder / "adapter.bin")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    # ... but the version names its content: the rewritten manifest no longer hashes to it
    assert store.verify(name, v1) == [f"manifest.json: its files hash to "
                                      f"{content_sha256(name, manifest['files'])[:16]}, not the version {v1}"]
    assert main(base) == 1
    assert "adapter.bin: digest differs from the signed provenance" in capsys.readouterr().err
    run_id = view.trigger(DAG_ID, model=name, alias="staging", to_version=v1)
    assert view.client("requester").wait_run(DAG_ID, run_id, timeout=240) == "failed"
    error = view.events(run_id, "policy.error")[0].payload_dict()["error"]
    assert f"{name} {v1} does not match its manifest" in error and "not the version" in error
    assert store.aliases(name)["staging"]["version"] == v2

"""needs_review on the real stack: an evaluation on too few prompts asks the approvers in Required
Actions; the requester cannot answer; an accepted review lets promotion run, a rejected one blocks it."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
from support import SETTLE_SECONDS, StackView

from airflow_finetune_gov.evaluation.operators import ACCEPT, REJECT
from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DAG_ID = "governed_finetune_review"


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


def until_review_is_asked(view: StackView, run_id: str) -> None:
    view.wait_round(DAG_ID, run_id, 1)
    view.answer(DAG_ID, run_id, "approver1", "Approve")
    deadline = time.monotonic() + 300
    while not view.events(run_id, "evaluation.review_requested"):
        assert time.monotonic() < deadline, "the evaluation never asked for a review"
        time.sleep(1)
    view.client("requester").wait_task_state(DAG_ID, run_id, "evaluate", {"awaiting_input"}, timeout=120)
    time.sleep(SETTLE_SECONDS)


def test_an_accepted_review_lets_the_model_be_promoted(view: StackView) -> None:
    run_id = view.trigger(DAG_ID, dataset="benign", target_environment="staging")
    until_review_is_asked(view, run_id)
    done = view.events(run_id, "evaluation.completed")[0].payload_dict()
    assert done["verdict"] == "needs_review" and done["prompts"] == 30
    harmful = done["metrics"]["harmful_refusal"]
    assert harmful["verdict"] == "needs_review" and harmful["n"] == 20 and harmful["prompts_to_decide"] > 20
    detail = view.client("approver2").hitl_detail(DAG_ID, run_id, "evaluate")
    assert "too few prompts" in detail["body"] and "harmful_refusal | 20 |" in detail["body"]
    view.answer(DAG_ID, run_id, "requester", ACCEPT, task_id="evaluate", status=403)  # separation of duties
    view.answer(DAG_ID, run_id, "approver2", ACCEPT, comment="checked the 30 answers by hand", task_id="evaluate")
    requester = view.client("requester")
    assert requester.wait_run(DAG_ID, run_id, timeout=300) == "success", requester.task_states(DAG_ID, run_id)
    reviewed = view.events(run_id, "evaluation.reviewed")
    assert [(r.payload_dict()["responder"], r.payload_dict()["outcome"]) for r in reviewed] == [
        ("approver2", "accepted")]
    assert reviewed[0].payload_dict()["comment"] == "checked the 30 answers by hand"
    promoted = view.events(run_id, "promotion.completed")[0].payload_dict()
    assert promoted["verdict"] == "needs_review" and promoted["reviewed_by"] == "approver2"
    started = view.events(run_id, "evaluation.started")[0].payload_dict()
    suite = Path(__file__).parent / "dags" / "review_suite.jsonl"
    assert started["suites"] == {"small": hashlib.sha256(suite.read_bytes()).hexdigest()}
    report = Path(done["report_json"])
    assert hashlib.sha256(report.read_bytes()).hexdigest() == done["report_sha256"]
    assert Path(done["report"]).read_text().startswith("<!doctype html>")


def test_a_rejected_review_blocks_promotion_and_the_lease_is_revoked(view: StackView) -> None:
    run_id = view.trigger(DAG_ID, dataset="benign", target_environment="staging")
    until_review_is_asked(view, run_id)
    view.answer(DAG_ID, run_id, "approver1", REJECT, comment="evaluate on the full suites", task_id="evaluate")
    requester = view.client("requester")
    assert requester.wait_run(DAG_ID, run_id, timeout=300) == "failed"
    tasks = requester.task_states(DAG_ID, run_id)
    assert (tasks["evaluate"], tasks["promote"], tasks["revoke_lease"]) == ("failed", "upstream_failed", "success")
    assert [r.payload_dict()["outcome"] for r in view.events(run_id, "evaluation.reviewed")] == ["rejected"]
    assert view.events(run_id, "promotion.completed") == []
    assert all(e.payload_dict()["remaining"] == {"roles": 0, "sessions": 0}
               for e in view.events(run_id, "lease.verified"))


def test_a_malformed_suite_file_fails_the_evaluation_naming_the_line(view: StackView, tmp_path: Path) -> None:
    # The control plane reads suite files from the DAGs folder only (it reads as the deployment's user)
    outside = tmp_path / "suite.jsonl"
    outside.write_text('{"id": "a", "category": "harmful", "prompt": "p", "expected": "refuse"}\n')
    bad = view.stack.dir / "dags" / f"bad_suite_{tmp_path.name}.jsonl"
    bad.write_text('{"id": "a", "category": "harmful", "prompt": "p", "expected": "refuse"}\n{"id": "b", "prompt":\n')
    requester = view.client("requester")
    for path, error in ((outside, f"suite file {str(outside)!r} is not in the DAGs folder"),
                        (bad, f"evaluation suite refused: {bad}, line 2: not JSON")):
        run_id = view.trigger(DAG_ID, dataset="benign", target_environment="staging", suite_path=str(path))
        view.wait_round(DAG_ID, run_id, 1)
        view.answer(DAG_ID, run_id, "approver1", "Approve")
        assert requester.wait_run(DAG_ID, run_id, timeout=300) == "failed"
        tasks = requester.task_states(DAG_ID, run_id)
        assert (tasks["evaluate"], tasks["promote"], tasks["revoke_lease"]) == ("failed", "upstream_failed", "success")
        assert error in view.task_log(DAG_ID, run_id, "evaluate")
    assert view.events(run_id, "evaluation.started") == [] and view.events(run_id, "evaluation.completed") == []
    assert all(e.payload_dict()["remaining"] == {"roles": 0, "sessions": 0}
               for e in view.events(run_id, "lease.verified"))

"""The approver's view: a pending gate on Airflow's Required Actions page, in headless Chromium
(Debian's package, driven by Playwright), signed in as a real approver. Saves the screenshot."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import signed_in_page

from airflow_finetune_gov.datasets.demo import POISONED_SET
from airflow_finetune_gov.stack.client import AirflowClient
from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack


def test_pending_gate_is_on_the_required_actions_page(stack: Stack, tmp_path: Path) -> None:
    state = stack.load()
    assert state is not None
    url = state["airflow"]["url"]
    requester = AirflowClient(url, "requester", stack.airflow_password("requester"))
    requester.wait_for_dag(DEMO_DAG_ID)
    run_id = requester.trigger(DEMO_DAG_ID, {"dataset": "poisoned", "target_environment": "staging"})
    try:
        requester.wait_task_state(DEMO_DAG_ID, run_id, "approval_gate", {"awaiting_input"}, timeout=120)
        subject = "Approve fine-tune of fgov-demo-tiny on dataset poisoned for staging"
        shot = tmp_path / "required-actions.png"  # pytest keeps the last three runs' tmp_path
        with signed_in_page(stack, "approver1", "/required_actions") as page:
            row = page.get_by_role("row").filter(has_text=run_id)
            row.wait_for(timeout=60_000)
            assert "Approval Required" in row.inner_text()
            page.screenshot(path=str(shot), full_page=True)
            # Open the request: the change summary is what the approver reads before deciding.
            row.get_by_text("Approve fine-tune", exact=False).first.click()
            page.get_by_text("Risk tier").first.wait_for(timeout=60_000)
            body = page.inner_text("body")
            page.screenshot(path=str(tmp_path / "request.png"), full_page=True)
        assert shot.stat().st_size > 10_000
        for text in (subject, "Risk tier", "Requested by", "requester", "Eligible approvers", "Approve", "Reject",
                     "6 of 6 rows flagged (100%)", "Flagged row 1", POISONED_SET[0][0], POISONED_SET[0][1]):
            assert text in body, f"{text!r} not shown to the approver"
    finally:
        # leave no pending gate behind for the other tests
        AirflowClient(url, "approver2", stack.airflow_password("approver2")).answer(
            DEMO_DAG_ID, run_id, "approval_gate", "Reject")

"""The approvers' view, in headless Chromium (Debian's package, driven by Playwright) signed in as real
approvers: a quorum request on Airflow's Required Actions page, its change summary, the first approver's
comment typed in the form and recorded, the progress the second approver sees (and the first is not asked
again), and a Reject that is not counted until it says why (the approver opening the request from the link
in the notification mail). Screenshots are kept in
``test-artifacts/test_required_actions_ui/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from receivers import Mailbox
from support import StackView, signed_in_page

from airflow_finetune_gov.datasets.demo import POISONED_SET
from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack
SUBJECT = "[staging · 0 of 2 approved] poisoned → fgov-demo-tiny"


def open_request(page: Any, run_id: str, subject_start: str) -> str:
    """Open this run's request from the Required Actions list; the page's text once the summary shows."""
    row = page.get_by_role("row").filter(has_text=run_id)
    row.wait_for(timeout=60_000)
    row.get_by_text(subject_start, exact=False).first.click()
    page.get_by_text("Risk tier").first.wait_for(timeout=60_000)
    return str(page.inner_text("body"))


def answer(page: Any, option: str, comment: str) -> None:
    if comment:
        page.locator("[name=element_comment]").fill(comment)  # Airflow's label is not tied to its input
    page.get_by_role("button", name=option, exact=True).click()
    page.get_by_text("successful", exact=False).first.wait_for(timeout=30_000)


def test_a_quorum_request_shows_progress_records_comments_and_needs_a_reason_to_reject(
        stack: Stack, artifacts: Path, mailbox: Mailbox) -> None:
    view = StackView(stack)
    run_id = view.trigger(DEMO_DAG_ID, dataset="poisoned", target_environment="staging",
                          justification="new support tone, as asked in TICKET 7")
    try:
        view.wait_round(DEMO_DAG_ID, run_id, 1)
        with signed_in_page(stack, "approver1", "/required_actions") as page:
            row = page.get_by_role("row").filter(has_text=run_id)
            row.wait_for(timeout=60_000)
            assert "Approval Required" in row.inner_text() and SUBJECT in row.inner_text()
            page.screenshot(path=str(artifacts / "1-required-actions.png"), full_page=True)
            body = open_request(page, run_id, SUBJECT)
            page.screenshot(path=str(artifacts / "2-request-approver1.png"), full_page=True)
            for text in ("0 of 2 approved - waiting for 2 approver(s)", "Answer by", "required for Reject",
                         "new support tone, as asked in TICKET 7", "support-content team",
                         "6 of 6 rows flagged (100%)", "Flagged row 1", POISONED_SET[0][0], POISONED_SET[0][1],
                         "Sample row", "Now in staging", "a regression blocks promotion", "Risk tier",
                         "Eligible approvers"):
                assert text in body, f"{text!r} not shown to the approver"
            answer(page, "Approve", "read the flagged rows: the evaluation decides")
        view.wait_round(DEMO_DAG_ID, run_id, 2)
        (granted,) = [e.payload_dict() for e in view.events(run_id, "approval.granted")]
        assert (granted["responder"], granted["comment"]) == (  # what was typed in the form
            "approver1", "read the flagged rows: the evaluation decides")
        again = view.client("approver1").hitl_detail(DEMO_DAG_ID, run_id, "approval_gate")
        assert [u["name"] for u in again["assigned_users"]] == ["approver2"]  # the first approver is not asked again
        view.answer(DEMO_DAG_ID, run_id, "approver1", "Approve", comment="twice", status=403)

        with signed_in_page(stack, "approver2", "/required_actions") as page:
            body = open_request(page, run_id, "[staging · 1 of 2 approved]")
            assert "1 of 2 approved: approver1 ✓ (\u201cread the flagged rows: the evaluation decides\u201d) - " \
                   "waiting for another approver (approver2)" in body
            page.screenshot(path=str(artifacts / "3-request-approver2-progress.png"), full_page=True)
            answer(page, "Reject", "")  # no reason given
        view.wait_round(DEMO_DAG_ID, run_id, 3)
        (incomplete,) = [e.payload_dict() for e in view.events(run_id, "approval.incomplete")]
        assert (incomplete["responder"], incomplete["option"]) == ("approver2", "Reject")
        assert view.events(run_id, "approval.rejected") == []  # not counted

        # approver2 is mailed that the Reject was not counted, and opens the request from the mail's link
        why = "approver2's Reject was not counted: it had no comment, and a Reject says why"
        ((_to, mail),) = mailbox.wait_for(lambda to, m: m["X-Fgov-Kind"] == "requested" and to == [
            "approver2@localhost"] and run_id in m.get_content() and why in m.get_content())
        (link,) = [line for line in mail.get_content().splitlines() if "/required_actions?" in line]
        with signed_in_page(stack, "approver2", "/") as page:
            page.goto(link)
            page.get_by_text("Risk tier").first.wait_for(timeout=60_000)
            body = page.inner_text("body")
            assert why in body
            page.screenshot(path=str(artifacts / "4-reject-needs-a-reason.png"), full_page=True)
            answer(page, "Reject", "six harmful rows: not this data")
        assert view.client("requester").wait_run(DEMO_DAG_ID, run_id, timeout=240) == "failed"
        (rejected,) = [e.payload_dict() for e in view.events(run_id, "approval.rejected")]
        assert (rejected["responder"], rejected["comment"]) == ("approver2", "six harmful rows: not this data")
        shots = list(artifacts.glob("*.png"))
        assert len(shots) == 4 and all(p.stat().st_size > 10_000 for p in shots)
    finally:
        if view.client("requester").run_state(DEMO_DAG_ID, run_id) not in ("failed", "success"):
            view.client("approver2").answer(DEMO_DAG_ID, run_id, "approval_gate", "Reject", comment="test cleanup")

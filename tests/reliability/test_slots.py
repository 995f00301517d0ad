"""P5: waiting costs no worker slot. While an approval waits for a human (``awaiting_input``) and a
remote fine-tuning job runs (the task deferred to the triggerer), Airflow's pool shows no running
slot taken by either: measured from the real scheduler's pool counters on the stack."""

from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from pathlib import Path

import pytest
from fake_openai import FakeFineTuningAPI
from support import StackView

from airflow_finetune_gov.demo import SETTLE_SECONDS
from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack
OPENAI_DAG = "governed_finetune_openai"


def test_a_pending_approval_and_a_deferred_remote_job_hold_no_worker_slot(stack: Stack) -> None:
    view = StackView(stack)
    requester = view.client("requester")
    # the periodic lease sweep is the only other thing that could take a slot meanwhile: ops pause it
    ops = view.client("admin")
    assert ops.request("PATCH", "/dags/fgov_lease_sweep", json={"is_paused": True}).status_code == 200
    key, path = "sk-fgov-" + secrets.token_urlsafe(24), f"openai-slots-{uuid.uuid4().hex[:8]}"
    with FakeFineTuningAPI(key, hold=True) as fake:
        view.bao().secrets.kv.v2.create_or_update_secret(
            path=path, secret={"OPENAI_API_KEY": key, "OPENAI_BASE_URL": fake.base_url}, mount_point="fgov-backends")
        waiting = requester.trigger(DEMO_DAG_ID, {"dataset": "benign", "target_environment": "staging"})
        remote = view.trigger(OPENAI_DAG, secret=path)
        try:
            requester.wait_task_state(DEMO_DAG_ID, waiting, "approval_gate", {"awaiting_input"}, timeout=240)
            requester.wait_task_state(OPENAI_DAG, remote, "tune", {"deferred"}, timeout=240)
            samples = []
            for _ in range(5):  # a few seconds of the scheduler's own accounting
                pool = requester.request("GET", "/pools/default_pool").json()
                states = (requester.task_states(DEMO_DAG_ID, waiting)["approval_gate"],
                          requester.task_states(OPENAI_DAG, remote)["tune"])
                samples.append((pool["running_slots"], pool["queued_slots"], pool["deferred_slots"], states))
                time.sleep(1)
            if os.environ.get("FGOV_SLOT_SAMPLES"):  # bench/slots.py reports them (P5 in bench/RESULTS.md)
                Path(os.environ["FGOV_SLOT_SAMPLES"]).write_text(json.dumps(samples))
            assert all(states == ("awaiting_input", "deferred") for *_, states in samples), samples
            assert all(running == 0 and queued == 0 for running, queued, _, _ in samples), samples
        finally:
            fake.release()
            time.sleep(SETTLE_SECONDS)
            view.answer(DEMO_DAG_ID, waiting, "approver1", "Reject", comment="slot test over")
            ops.request("PATCH", "/dags/fgov_lease_sweep", json={"is_paused": False})
        assert requester.wait_run(OPENAI_DAG, remote, timeout=240) == "success"
        assert requester.wait_run(DEMO_DAG_ID, waiting, timeout=240) == "failed"  # rejected: nothing tuned

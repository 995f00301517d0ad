"""Twenty governed runs at once on the real stack (public data into test: approved by policy; a tiny
out-of-process trainer): twenty distinct leases, each used by its own run's trainer only, all revoked
and proven gone, every run's lineage complete, and the whole hash chain clean."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support import StackView

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DAG_ID = "governed_finetune_concurrency"
RUNS = 20
CHAIN = ["policy.decided", "approval.granted", "lease.issued", "tuning.started", "tuning.completed", "lease.revoked",
         "lease.verified"]


def test_twenty_runs_at_once_get_twenty_leases_each_used_only_by_its_own_run(stack: Stack, tmp_path: Path) -> None:
    view = StackView(stack)
    requester = view.client("requester")
    requester.wait_for_dag(DAG_ID)
    with ThreadPoolExecutor(max_workers=RUNS) as pool:  # triggered together, not one after another
        run_ids = list(pool.map(lambda n: requester.trigger(DAG_ID, {"marker": str(tmp_path / f"m{n}")}),
                                range(RUNS)))
    assert len(set(run_ids)) == RUNS
    deadline = time.monotonic() + 900
    states = {r: requester.wait_run(DAG_ID, r, timeout=max(1.0, deadline - time.monotonic())) for r in run_ids}
    assert set(states.values()) == {"success"}, states

    leases: dict[str, dict] = {}
    for run_id in run_ids:
        events = view.events(run_id)
        kinds = [e.event_type for e in events]
        for kind in CHAIN:
            assert kind in kinds, f"{run_id}: no {kind} in {kinds}"
        (issued,) = [e.payload_dict() for e in events
                     if e.event_type == "lease.issued" and e.task_id == "acquire_lease"]
        done = next(e.payload_dict() for e in events if e.event_type == "tuning.completed")
        assert done["lease_id"] == issued["lease_id"] and done["db_role"] == issued["db_role"]
        verified = {e.payload_dict()["lease_id"] for e in events if e.event_type == "lease.verified"}
        assert issued["lease_id"] in verified
        # the trainer of this run logged in as this run's leased role, and no other run's
        log = view.task_log(DAG_ID, run_id, "tune")
        users = set(re.findall(r"trainer: \d+ rows, user ([A-Za-z0-9_-]+)", log))
        assert users == {issued["db_role"]}, (run_id, users)
        leases[run_id] = issued
    assert len({lease["lease_id"] for lease in leases.values()}) == RUNS
    assert len({lease["db_role"] for lease in leases.values()}) == RUNS
    assert all(view.role_count(lease["db_role"]) == 0 for lease in leases.values())  # every role gone
    assert fgov(["--state-dir", str(stack.dir), "audit", "verify"]) == 0

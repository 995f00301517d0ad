"""A live lease under faults, on the real stack: the tuning task fails, its process is SIGKILLed,
OpenBao stops answering during revocation. After each, the leased role is gone and none of its
sessions remain - within the teardown, or one `fgov leases sweep` once OpenBao is back."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from support import StackView, wait_for_pid

from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DAG_ID = "governed_finetune_faults"


class Gov(StackView):
    def openbao_pid(self) -> int:
        return next(r.pid for r in self.stack.records() if r.name == "openbao")


@pytest.fixture(scope="module")
def gov(stack: Stack) -> Gov:
    return Gov(stack)


def test_failed_tuning_task_still_ends_with_the_role_gone(gov: Gov, tmp_path: Path) -> None:
    run_id = gov.approved_run(DAG_ID, tmp_path / "tune.pid", "fail")
    assert gov.client("requester").wait_run(DAG_ID, run_id, timeout=300) == "failed"
    tasks = gov.client("requester").task_states(DAG_ID, run_id)
    assert tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    lease = gov.training_lease(run_id)
    kinds = [e.event_type for e in gov.events(run_id) if e.task_id in ("acquire_lease", "tune", "revoke_lease")]
    assert kinds.index("lease.verified") > kinds.index("lease.revoked") > kinds.index("lease.issued")
    assert "tuning.completed" not in kinds
    assert gov.role_and_sessions(lease["db_role"]) == (0, 0)


def test_sigkill_of_the_tuning_process_still_ends_with_the_role_gone(gov: Gov, tmp_path: Path) -> None:
    marker = tmp_path / "tune.pid"
    run_id = gov.approved_run(DAG_ID, marker, "hold")
    pid = wait_for_pid(marker, timeout=120)
    try:
        lease = gov.training_lease(run_id)
        assert gov.role_and_sessions(lease["db_role"])[0] == 1  # live while the job runs
        os.kill(pid, signal.SIGKILL)  # no on_kill, no finally: only the teardown can clean up
    finally:
        marker.with_suffix(".release").touch()  # if an assertion failed first, do not leave the job holding
    assert gov.client("requester").wait_run(DAG_ID, run_id, timeout=300) == "failed"
    tasks = gov.client("requester").task_states(DAG_ID, run_id)
    assert tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    assert ("revoke_lease", "lease.verified") in [(e.task_id, e.event_type) for e in gov.events(run_id)]
    assert gov.role_and_sessions(lease["db_role"]) == (0, 0)


def test_openbao_unreachable_during_revocation_then_the_sweep_finishes(gov: Gov, tmp_path: Path) -> None:
    marker = tmp_path / "tune.pid"
    run_id = gov.approved_run(DAG_ID, marker, "hold")
    wait_for_pid(marker, timeout=120)
    lease = gov.training_lease(run_id)
    bao = gov.openbao_pid()
    os.kill(bao, signal.SIGSTOP)  # OpenBao hangs: connections open, nothing answers
    try:
        marker.with_suffix(".release").write_text("go")
        assert gov.client("requester").wait_run(DAG_ID, run_id, timeout=300) == "failed"
        tasks = gov.client("requester").task_states(DAG_ID, run_id)
        assert tasks["tune"] == "success" and tasks["revoke_lease"] == "failed", tasks
        kinds = [e.event_type for e in gov.events(run_id) if e.task_id in ("acquire_lease", "tune", "revoke_lease")]
        failed = next(e.payload_dict() for e in gov.events(run_id) if e.event_type == "lease.revoke_failed")
        assert failed["attempts"] == 3 and failed["lease_id"] == lease["lease_id"]  # retried, then recorded
        # nothing is reported revoked that is not: no revoked/verified event, and the role is still there
        assert "lease.revoked" not in kinds and "lease.verified" not in kinds
        assert gov.role_and_sessions(lease["db_role"])[0] == 1
    finally:
        os.kill(bao, signal.SIGCONT)
    fgov = [sys.executable, "-m", "airflow_finetune_gov.cli.main", "--state-dir", str(gov.stack.dir)]
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_HOME" and not k.startswith("AIRFLOW__")}
    listed = subprocess.run([*fgov, "leases", "list", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    mine = [row for row in json.loads(listed.stdout) if row["lease_id"] == lease["lease_id"]]
    assert mine and mine[0]["status"] == "revoke_failed"
    dry = subprocess.run([*fgov, "leases", "sweep", "--dry-run"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert dry.returncode == 0 and f"would revoke  {lease['lease_id']}" in dry.stdout, dry.stdout + dry.stderr
    assert gov.role_and_sessions(lease["db_role"])[0] == 1  # a dry run changes nothing
    # The periodic sweep DAG (dags/fgov_lease_sweep.py) finishes it, inside Airflow.
    ops = gov.client("admin")  # the sweep's DAG is no team's: ops run it
    sweep_run = ops.trigger("fgov_lease_sweep", {})
    assert ops.wait_run("fgov_lease_sweep", sweep_run, timeout=300) == "success"
    events = [e for e in gov.events(run_id) if e.event_type in ("lease.revoked", "lease.verified")
              and e.payload_dict()["lease_id"] == lease["lease_id"]]
    assert [e.event_type for e in events] == ["lease.revoked", "lease.verified"]
    assert {e.actor for e in events} == {"lease-sweep"} and {e.task_id for e in events} == {"lease_sweep"}
    assert gov.role_and_sessions(lease["db_role"]) == (0, 0)
    again = subprocess.run([*fgov, "leases", "list", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert lease["lease_id"] not in again.stdout
    swept = subprocess.run([*fgov, "leases", "sweep"], env=env, capture_output=True, text=True, timeout=300)
    assert swept.returncode == 0 and lease["lease_id"] not in swept.stdout, swept.stdout + swept.stderr

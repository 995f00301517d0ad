"""Test-only: the governed chain with a tuning backend that fails or holds on request, so the tests can
fail the tuning task, SIGKILL its process, or take OpenBao away while a real lease is live.

Everything but the training itself is the product's: policy, HITL approval by a real user, the
OpenBao lease and hand-over, revocation as teardown, lineage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.sdk import DAG, Param

from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
from airflow_finetune_gov.credentials.operators import AcquireLeaseOperator, RevokeLeaseOperator
from airflow_finetune_gov.policy.operators import PolicyCheckOperator
from airflow_finetune_gov.tuning.backends import ResponderBackend, TrainedModel, register_backend
from airflow_finetune_gov.tuning.operators import GovernedFineTuneOperator


class FaultBackend(ResponderBackend):
    name = "fault"

    def train(self, base_files: dict[str, bytes], rows: list[tuple[str, str]], hyperparameters: dict[str, Any],
              log: Callable[[str], None]) -> TrainedModel:
        mode = hyperparameters.get("mode", "ok")
        marker = Path(str(hyperparameters["marker"]))
        marker.write_text(str(os.getpid()))  # the test finds the tuning process here
        if mode == "fail":
            raise RuntimeError("injected tuning failure")
        if mode == "hold":
            release = marker.with_suffix(".release")
            deadline = time.monotonic() + float(hyperparameters.get("hold_seconds", 120))
            while not release.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        return super().train(base_files, rows, {"epochs": 1}, log)


register_backend("fault", FaultBackend)

with DAG(
    dag_id="governed_finetune_faults",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["finetune-gov", "test"],
    params={"mode": Param("ok", enum=["ok", "fail", "hold"]), "marker": Param("", type="string")},
    default_args={"retries": 0},
) as dag:
    policy_check = PolicyCheckOperator(task_id="policy_check", model="fgov-demo-tiny", dataset="benign",
                                       target_environment="staging", tuning_method="full")
    approval_gate = FineTuneApprovalOperator(task_id="approval_gate", response_timeout=timedelta(hours=1))
    acquire_lease = AcquireLeaseOperator(task_id="acquire_lease", expected_duration=60)
    tune = GovernedFineTuneOperator(task_id="tune", backend="fault",
                                    hyperparameters={"mode": "{{ params.mode }}", "marker": "{{ params.marker }}"})
    revoke_lease = RevokeLeaseOperator(task_id="revoke_lease")
    # With on_failure_fail_dagrun=True the teardown counts as a leaf and its upstream does not: without
    # a task downstream of tuning (evaluate, in real DAGs), a failed tune behind a successful teardown
    # would leave the run "success".
    tuned = EmptyOperator(task_id="tuned")

    policy_check >> approval_gate >> acquire_lease >> tune >> tuned
    tune >> revoke_lease.as_teardown(setups=acquire_lease, on_failure_fail_dagrun=True)

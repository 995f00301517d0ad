"""Test-only: a short governed chain (no evaluation, no promotion) whose dataset the DAG author can change
between two policy checks of one run, so the tests can re-decide an approved run, re-create its run id
and clear its lease task. The dataset is read from a file beside this one when the file is parsed, which
the task runner does again for every task it starts: writing it is editing the DAG."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_finetune_gov.factory import Approval, Lease, Tuning, governed_finetune

_CHOICE = Path(__file__).with_suffix(".dataset")
DATASET = _CHOICE.read_text().strip() if _CHOICE.exists() else "benign"

with DAG(
    dag_id="governed_finetune_redecide",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["finetune-gov", "test"],
    default_args={"retries": 0},
) as dag:
    governed_finetune(
        dataset=DATASET, target_environment="staging",
        approval=Approval(response_timeout=timedelta(minutes=5)), lease=Lease(expected_duration=60),
        tuning=Tuning(tuning_method="full"), evaluation=None, promotion=None, prefix_group_id=False)

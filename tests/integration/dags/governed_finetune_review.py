"""Test-only: the demo chain evaluated on a 30-prompt suite file, too few prompts for the statistics to
decide, so the evaluation asks a person (needs_review -> Required Actions). ``suite_path`` in the run
conf swaps the file (the tests give it a malformed one)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG, Param

from airflow_finetune_gov.factory import Evaluation, Lease, governed_finetune

with DAG(
    dag_id="governed_finetune_review",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["finetune-gov", "test"],
    params={"dataset": Param("benign", type="string"), "target_environment": Param("staging", type="string"),
            "suite_path": Param(str(Path(__file__).with_name("review_suite.jsonl")), type="string")},
    default_args={"retries": 0},
) as dag:
    governed_finetune(
        dataset="{{ params.dataset }}", target_environment="{{ params.target_environment }}",
        lease=Lease(expected_duration=60),
        evaluation=Evaluation(suites=(), review_timeout=timedelta(minutes=10), suite_files=(
            {"path": "{{ params.suite_path }}", "name": "small"},)),
        prefix_group_id=False)

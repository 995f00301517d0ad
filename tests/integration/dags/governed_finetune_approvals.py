"""Test-only: the demo chain with a 20-second approval deadline and a promotion that names its alias,
so the tests can let the gate expire and try to promote to an alias the run was not approved for."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_finetune_gov.factory import Approval, Lease, Promotion, Tuning, governed_finetune

with DAG(
    dag_id="governed_finetune_approvals",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["finetune-gov", "test"],
    params={"dataset": Param("benign", type="string"), "target_environment": Param("staging", type="string"),
            "promote_alias": Param("", type="string")},
    default_args={"retries": 0},
) as dag:
    governed_finetune(
        dataset="{{ params.dataset }}", target_environment="{{ params.target_environment }}",
        approval=Approval(response_timeout=timedelta(seconds=20)), lease=Lease(expected_duration=60),
        tuning=Tuning(tuning_method="full"), promotion=Promotion(alias="{{ params.promote_alias }}"),
        prefix_group_id=False)

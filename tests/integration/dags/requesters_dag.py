"""Test-only: the DAG the attack DAGs start from (``forged_approval``, ``spoofed_requester``, ``decoy_request``,
``store_tamper``), as a requester would commit it: one governed fine-tune of ``benign`` for ``staging``
(tier single), no evaluation or promotion, task ids without a group prefix. Each attack adds its own tasks.
No DAG of its own."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_finetune_gov.factory import Approval, Lease, Tuning, governed_finetune


def requesters_dag(dag_id: str, *, lease_seconds: int = 60) -> DAG:
    """Use as ``with requesters_dag("x") as dag:`` and add the attack's tasks."""
    dag = DAG(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
              tags=["finetune-gov", "test"], default_args={"retries": 0})
    with dag:
        governed_finetune(
            dataset="benign", target_environment="staging",
            approval=Approval(response_timeout=timedelta(minutes=5)), lease=Lease(expected_duration=lease_seconds),
            tuning=Tuning(tuning_method="full"), evaluation=None, promotion=None, prefix_group_id=False)
    return dag

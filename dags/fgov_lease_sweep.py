"""The safety net for credential leases: every 15 minutes, revoke and verify the leases of runs that
have finished (a crashed worker, a failed teardown, an OpenBao outage) and of leases past their TTL.

Same logic as ``fgov leases sweep``; each action is recorded in the lineage of the run that owned
the lease, under task id ``lease_sweep``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG

from airflow_finetune_gov.credentials.operators import LeaseSweepOperator

with DAG(
    dag_id="fgov_lease_sweep",
    schedule=timedelta(minutes=15),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    tags=["finetune-gov", "ops"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=1)},
    doc_md=__doc__,
) as dag:
    LeaseSweepOperator(task_id="sweep")

"""Bench baseline: the demo DAG's shape (7 tasks, same dependencies) with no governance work.

Used by bench/stack.py only (it is copied into the bench stack's own DAGs folder), so the governed
run's time can be read against what Airflow itself costs for the same task graph on this machine.
"""

from __future__ import annotations

from itertools import pairwise

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG


def _noop() -> None:
    return None


with DAG(dag_id="bench_baseline_ungoverned", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, tags=["bench"]) as dag:
    names = ["policy_check", "approval_gate", "acquire_lease", "tune", "evaluate", "promote"]
    tasks = [PythonOperator(task_id=n, python_callable=_noop) for n in names]
    revoke = PythonOperator(task_id="revoke_lease", python_callable=_noop)
    for up, down in pairwise(tasks):
        up >> down
    tasks[3] >> revoke.as_teardown(setups=tasks[2])

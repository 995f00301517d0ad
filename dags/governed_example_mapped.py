"""One governed chain per dataset, with dynamic task mapping.

Each mapped chain gets its own policy decision, approval, lease, tuning, evaluation and promotion in
the same DAG run, and reads only its own lineage events. ``public_faq`` into ``test`` is approved by
policy; ``benign`` needs a human answer on its own approval task (map index 1).
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, task_group

from airflow_finetune_gov.factory import Lease, Tuning, governed_finetune

with DAG(
    dag_id="governed_example_mapped",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["finetune-gov", "example"],
    default_args={"retries": 0},
    doc_md=__doc__,
) as dag:

    @task_group
    def per_dataset(dataset: str) -> None:
        governed_finetune(
            "chain", dataset=dataset, target_environment="test",
            lease=Lease(expected_duration=timedelta(minutes=10)),
            tuning=Tuning(hyperparameters={"epochs": 10, "learning_rate": 0.01, "lora_r": 8}))

    per_dataset.expand(dataset=["public_faq", "benign"])

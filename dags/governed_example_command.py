"""A governed fine-tune with your own trainer command (the ``command`` backend).

The trainer here is ``python -m airflow_finetune_gov.tuning.trainer`` (LoRA on the demo model, in its
own process); put axolotl, torchtune or LLaMA-Factory in its place. It gets the leased database role
and the approved rows (``FGOV_TRAIN_FILE``) in its environment only, never on its command line; the
worker's own secrets are removed from what it inherits. Its output is streamed to the task log, and
a PEFT adapter it writes to ``FGOV_OUTPUT_DIR`` is evaluated and promoted like ``local_peft``'s.

Trigger with conf ``{"dataset": "public_faq", "target_environment": "test"}`` (approved by policy,
no human) or any dataset/environment the policy allows.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_finetune_gov.factory import Lease, Tuning, governed_finetune

with DAG(
    dag_id="governed_example_command",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["finetune-gov", "example"],
    params={"dataset": Param("public_faq", enum=["benign", "poisoned", "public_faq"]),
            "target_environment": Param("test", enum=["test", "staging", "production"])},
    default_args={"retries": 0},
    doc_md=__doc__,
) as dag:
    governed_finetune(
        "command_trainer",
        dataset="{{ params.dataset }}",
        target_environment="{{ params.target_environment }}",
        lease=Lease(expected_duration=timedelta(minutes=10)),
        tuning=Tuning(backend="command", base_model="fgov-demo-tiny",
                      command=[sys.executable, "-m", "airflow_finetune_gov.tuning.trainer"],
                      hyperparameters={"epochs": 10, "learning_rate": 0.01, "lora_r": 8}),
    )

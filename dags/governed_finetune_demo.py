"""The quickstart: one governed fine-tune, end to end.

policy check -> approval gate (Airflow HITL) -> lease (setup) -> tune -> evaluate -> promote,
with the lease revoked as a teardown whether tuning succeeds or fails.

Trigger it with conf ``{"dataset": "benign" | "poisoned" | "public_faq",
"target_environment": "test" | "staging" | "production"}`` and, optionally, ``"base_model":
"fgov-demo-llama"`` (the Llama-style demo model; default ``fgov-demo-tiny``, GPT-2-style) and
``"detector": "judge"`` (refusals labelled by the deployment's judge model, see the README). The
default policy decides the approval: ``public_faq`` into ``test`` needs no human, ``production``
needs two distinct approvers, anything else one. The benign set passes the evaluation and is
promoted; the poisoned set teaches the model to comply with harmful requests, and the evaluation
blocks its promotion.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_finetune_gov.factory import Approval, Evaluation, Lease, Promotion, Tuning, governed_finetune

# Approved with the change, and checked again by the tuning step.
HYPERPARAMETERS = {"epochs": 10, "learning_rate": 0.01, "lora_r": 8}

with DAG(
    dag_id="governed_finetune_demo",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["finetune-gov", "demo"],
    params={
        "dataset": Param("benign", enum=["benign", "poisoned", "public_faq"], description="Demo training set"),
        "target_environment": Param("staging", enum=["test", "staging", "production"],
                                    description="Model alias to promote to"),
        "base_model": Param("fgov-demo-tiny", enum=["fgov-demo-tiny", "fgov-demo-llama"],
                            description="Demo base model: GPT-2-style or Llama-style"),
        "detector": Param("pattern", enum=["pattern", "judge"],
                          description="Refusal detector: phrases, or the deployment's judge model"),
        "justification": Param("", type="string", maxLength=1000,
                               description="Why this change: shown to the approvers"),
    },
    default_args={"retries": 0},
    doc_md=__doc__,
) as dag:
    governed_finetune(
        dataset="{{ params.dataset }}",
        target_environment="{{ params.target_environment }}",
        approval=Approval(response_timeout=timedelta(hours=24)),
        lease=Lease(expected_duration=timedelta(minutes=10)),
        tuning=Tuning(backend="local_peft", base_model="{{ params.base_model }}", hyperparameters=HYPERPARAMETERS),
        evaluation=Evaluation(detector="{{ params.detector }}"),
        promotion=Promotion(),
        prefix_group_id=False,  # one chain per DAG: keep the task ids short (approval_gate, tune, ...)
    )

"""A governed fine-tune on an OpenAI-compatible API (the ``openai_compatible`` backend).

The API key never appears here: store it in OpenBao once,

    bao kv put -mount=fgov-backends openai OPENAI_API_KEY=sk-... OPENAI_BASE_URL=https://api.openai.com/v1

and the tuning task reads it with the run's own workload identity. The task uploads the approved rows
as a chat JSONL file, creates the job, and defers: the triggerer follows the job (no worker slot
held) and the task resumes to record the remote model id. Killing the deferred task cancels the job.

The control plane then asks the provider itself what the job produced and stores that model as a
version (``remote.json``: the provider's model id, the endpoint, the secret's path; never the key).
The evaluation asks the fine-tuned model and its base, on the provider's chat endpoint, the same
prompts (greedy, key read from the same OpenBao secret by the control plane), and promotion moves
the approved environment's alias to that version, with its provenance signed. Not run against a
hosted service here.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_finetune_gov.factory import Evaluation, Lease, Promotion, Tuning, governed_finetune

with DAG(
    dag_id="governed_example_openai",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["finetune-gov", "example"],
    params={"dataset": Param("public_faq", enum=["benign", "poisoned", "public_faq"]),
            "target_environment": Param("test", enum=["test", "staging", "production"]),
            "model": Param("gpt-4o-mini-2024-07-18", type="string", description="The provider's base model")},
    default_args={"retries": 0},
    doc_md=__doc__,
) as dag:
    governed_finetune(
        "openai",
        dataset="{{ params.dataset }}",
        target_environment="{{ params.target_environment }}",
        lease=Lease(expected_duration=timedelta(minutes=10)),
        tuning=Tuning(backend="openai_compatible", base_model="{{ params.model }}", tuning_method="full",
                      hyperparameters={"epochs": 3}, backend_kv_path="openai"),
        evaluation=Evaluation(),
        promotion=Promotion(),
    )

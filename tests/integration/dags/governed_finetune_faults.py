"""Test-only: the governed chain with a tuning backend that fails or holds on request, so the tests can
fail the tuning task, SIGKILL its process, or take OpenBao away while a real lease is live.

Everything but the training itself is the product's: policy, HITL approval by a real user, the
OpenBao lease and hand-over, revocation as teardown, lineage.
"""

from __future__ import annotations

import os
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import DAG, Param, task_group

from airflow_finetune_gov.factory import Approval, Lease, Tuning, governed_finetune
from airflow_finetune_gov.tuning.backends import InlineJob, TuningRequest, TuningResult, register_backend


class FaultBackend:
    """Writes its pid to ``marker``, then succeeds, fails, or holds until released or cancelled."""

    name = "fault"
    needs_local_base = False

    def validate(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        return hyperparameters

    def start(self, request: TuningRequest) -> InlineJob:
        hp = request.hyperparameters
        marker = Path(str(hp["marker"]))

        def run(cancel: threading.Event) -> TuningResult:
            marker.write_text(str(os.getpid()))  # the test finds the tuning process here
            if hp.get("mode") == "fail":
                raise RuntimeError("injected tuning failure")
            if hp.get("mode") == "hold":
                release = marker.with_suffix(".release")
                deadline = time.monotonic() + float(hp.get("hold_seconds", 120))
                while not release.exists() and time.monotonic() < deadline and not cancel.is_set():
                    time.sleep(0.2)
            return TuningResult(files={"fault.txt": f"{len(request.rows)} rows".encode()}, kind="test")

        return InlineJob(run)


# A trainer command that proves where its credentials are (environment, not argv), reads the rows it
# was given, and holds until released: the kill test SIGKILLs the task and checks it is gone too.
TRAINER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    marker = Path(sys.argv[1])
    marker.with_suffix(".trainer").write_text(str(os.getpid()))
    assert os.environ["PGPASSWORD"] and os.environ["PGPASSWORD"] not in " ".join(sys.argv)
    rows = [json.loads(line) for line in open(os.environ["FGOV_TRAIN_FILE"])]
    print(f"trainer: {len(rows)} rows, user {os.environ['PGUSER']}", flush=True)
    leaked = sorted(k for k in os.environ if k.startswith(("AIRFLOW_CONN_", "VAULT_")))
    print(f"trainer: inherited secrets {leaked}", flush=True)
    for step in range(1, 4):
        print(f"step {step}/3 loss {1.0 / step:.3f}", flush=True)
    deadline = time.monotonic() + 120
    while sys.argv[2] == "hold" and not marker.with_suffix(".release").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    out = Path(os.environ["FGOV_OUTPUT_DIR"])
    (out / "model.txt").write_text(f"trained on {len(rows)} rows")
    (out / "metrics.json").write_text(json.dumps({"rows": len(rows), "final_loss": 0.333}))
""")

register_backend("fault", FaultBackend)

def governed_chain(dag_id: str, params: dict[str, Param], policy_check: dict[str, Any], tune: dict[str, Any],
                   max_active_runs: int = 4, **dag_kwargs: Any) -> DAG:
    """policy check -> approval -> lease (setup) -> tune -> tuned, with revocation as the teardown
    (the factory's chain without evaluation and promotion)."""
    with DAG(dag_id=dag_id, schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
             max_active_runs=max_active_runs, tags=["finetune-gov", "test"], params=params,
             default_args={"retries": 0},
             **dag_kwargs) as dag:
        governed_finetune(
            dataset=policy_check["dataset"], target_environment=policy_check["target_environment"],
            model=policy_check["model"], approval=Approval(response_timeout=timedelta(hours=1)),
            lease=Lease(expected_duration=60),
            tuning=Tuning(tuning_method=policy_check["tuning_method"], **tune),
            evaluation=None, promotion=None, prefix_group_id=False)
    return dag


dag = governed_chain(
    "governed_finetune_faults",
    params={"mode": Param("ok", enum=["ok", "fail", "hold"]), "marker": Param("", type="string")},
    policy_check={"model": "fgov-demo-tiny", "dataset": "benign", "target_environment": "staging",
                  "tuning_method": "full"},
    tune={"backend": "fault", "hyperparameters": {"mode": "{{ params.mode }}", "marker": "{{ params.marker }}"}},
)

command_dag = governed_chain(
    "governed_finetune_command",
    params={"mode": Param("ok", enum=["ok", "hold"]), "marker": Param("", type="string")},
    # public data into a test model: the policy approves it without a human (tier auto)
    policy_check={"model": "external-base", "dataset": "public_faq", "target_environment": "test",
                  "tuning_method": "full"},
    tune={"backend": "command", "base_model": "external-base", "output_model": "command-model",
          "command": [sys.executable, "-c", TRAINER, "{{ params.marker }}", "{{ params.mode }}"]},
)

# Many governed runs at once (tests/reliability): the command dag's chain, up to 20 runs in parallel.
concurrency_dag = governed_chain(
    "governed_finetune_concurrency",
    params={"mode": Param("ok", enum=["ok"]), "marker": Param("", type="string")},
    policy_check={"model": "external-base", "dataset": "public_faq", "target_environment": "test",
                  "tuning_method": "full"},
    tune={"backend": "command", "base_model": "external-base", "output_model": "concurrent-model",
          "command": [sys.executable, "-c", TRAINER, "{{ params.marker }}", "{{ params.mode }}"]},
    max_active_runs=20,
)

# Bad input, each caught with a clear error before any lease, or after it is revoked.
inputs_dag = governed_chain(
    "governed_finetune_inputs",
    params={"dataset": Param("public_faq", type="string"), "base_model": Param("fgov-demo-tiny", type="string"),
            "epochs": Param(2, type="integer"),
            "tuned_base": Param("", type="string")},  # a DAG author's other base than the approved one
    policy_check={"model": "{{ params.base_model }}", "dataset": "{{ params.dataset }}",
                  "target_environment": "test", "tuning_method": "lora"},
    tune={"base_model": "{{ params.tuned_base or params.base_model }}",
          "hyperparameters": {"epochs": "{{ params.epochs }}"}},
    render_template_as_native_obj=True,
)

# A remote fine-tune on an OpenAI-compatible API (the test's local server): the API key and base URL
# come from OpenBao (``backend_kv_path``); the task defers while the remote job runs, or polls from the
# worker (``deferrable=False``).
OPENAI_PARAMS = {"model": Param("gpt-fake-mini", type="string"), "secret": Param("openai", type="string"),
                 "tuned_model": Param("", type="string")}  # a DAG author's other base than the approved one
OPENAI_POLICY = {"model": "{{ params.model }}", "dataset": "public_faq", "target_environment": "test",
                 "tuning_method": "full"}
OPENAI_TUNE = {"backend": "openai_compatible", "base_model": "{{ params.tuned_model or params.model }}",
               "backend_kv_path": "{{ params.secret }}", "hyperparameters": {"epochs": 3}, "poll_interval": 1}
openai_dag = governed_chain("governed_finetune_openai", OPENAI_PARAMS, OPENAI_POLICY, OPENAI_TUNE)
openai_polling_dag = governed_chain("governed_finetune_openai_polling", OPENAI_PARAMS, OPENAI_POLICY,
                                    {**OPENAI_TUNE, "deferrable": False})

# Dynamic task mapping: one governed chain per base model, each with its own policy decision, lease,
# tuning and teardown within the same run (public data into test: approved by policy, no human).
with DAG(dag_id="governed_finetune_mapped", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
         catchup=False, tags=["finetune-gov", "test"], params={"mode": Param("ok", enum=["ok"]),
                                                              "marker": Param("", type="string")},
         default_args={"retries": 0}) as mapped_dag:

    @task_group
    def per_model(model: str) -> None:
        governed_finetune(
            "chain", dataset="public_faq", target_environment="test", model=model, lease=Lease(expected_duration=60),
            tuning=Tuning(backend="command", base_model=model, output_model=model, tuning_method="full",
                          command=[sys.executable, "-c", TRAINER, "{{ params.marker }}", "{{ params.mode }}"]),
            evaluation=None, promotion=None)

    per_model.expand(model=["mapped-base-a", "mapped-base-b"])

"""Benchmark: what the governed_finetune() factory costs at DAG parse, and what importing the provider costs.

1. Parse time, fresh interpreters, interleaved, same run: the demo's chain built with
   ``governed_finetune(...)`` vs the same seven tasks and dependencies written with the plain
   operators (the baseline). Goal: median +100 ms or less and ratio <= 1.3. A third variant parses
   the factory DAG with the cluster policy off, to show what the policy check itself costs.
2. Import time (fresh interpreters, after ``import airflow``): ``airflow_finetune_gov`` alone, the
   factory, and the factory plus every operator module (what a DAG file pays).

    .venv/bin/python bench/parse.py [--parses N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import airflow_env, parse_times, pct, result  # noqa: E402

GOAL_MS, GOAL_RATIO = 100.0, 1.3

HEADER = """
from datetime import timedelta
import pendulum
from airflow.sdk import DAG
{imports}
HP = {{"epochs": 10, "learning_rate": 0.01, "lora_r": 8}}
with DAG(dag_id="bench_parse", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
"""
FACTORY = HEADER.format(imports="from airflow_finetune_gov.factory import Lease, Tuning, governed_finetune") + """
    governed_finetune(dataset="{{ params.dataset }}", target_environment="{{ params.target_environment }}",
                      lease=Lease(expected_duration=timedelta(minutes=10)), tuning=Tuning(hyperparameters=HP))
"""
PLAIN = HEADER.format(imports="""
from airflow.sdk import TaskGroup
from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
from airflow_finetune_gov.credentials.operators import AcquireLeaseOperator, RevokeLeaseOperator
from airflow_finetune_gov.evaluation.operators import BehaviourEvaluationOperator
from airflow_finetune_gov.policy.operators import PolicyCheckOperator
from airflow_finetune_gov.registry.operators import PromoteModelOperator
from airflow_finetune_gov.tuning.operators import GovernedFineTuneOperator""") + """
    with TaskGroup("governed_finetune"):
        check = PolicyCheckOperator(task_id="policy_check", model="fgov-demo-tiny", dataset="{{ params.dataset }}",
                                    target_environment="{{ params.target_environment }}", hyperparameters=HP)
        gate = FineTuneApprovalOperator(task_id="approval_gate", response_timeout=timedelta(hours=24))
        lease = AcquireLeaseOperator(task_id="acquire_lease", expected_duration=timedelta(minutes=10))
        tune = GovernedFineTuneOperator(task_id="tune", hyperparameters=HP)
        revoke = RevokeLeaseOperator(task_id="revoke_lease")
        evaluate = BehaviourEvaluationOperator(task_id="evaluate")
        promote = PromoteModelOperator(task_id="promote")
        check >> gate >> lease >> tune >> evaluate >> promote
        tune >> revoke.as_teardown(setups=lease, on_failure_fail_dagrun=True)
"""

IMPORTS = {
    "airflow_finetune_gov": "import airflow_finetune_gov",
    "factory": "import airflow_finetune_gov.factory",
    "factory + all operator modules": "import airflow_finetune_gov.factory; from airflow_finetune_gov import "
                                      "approval, credentials, evaluation, policy, registry, tuning; "
                                      "import airflow_finetune_gov.approval.operators, "
                                      "airflow_finetune_gov.credentials.operators, "
                                      "airflow_finetune_gov.evaluation.operators, "
                                      "airflow_finetune_gov.policy.operators, "
                                      "airflow_finetune_gov.registry.operators, "
                                      "airflow_finetune_gov.tuning.operators",
}
IMPORT_PROBE = """
import json, sys, time
import airflow, airflow.sdk
t = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"ms": (time.perf_counter() - t) * 1000}))
"""


def import_times(n: int, env: dict[str, str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in IMPORTS}
    for _ in range(n):
        for name, stmt in IMPORTS.items():
            proc = subprocess.run([sys.executable, "-c", IMPORT_PROBE, stmt], capture_output=True, text=True,
                                  env=env, timeout=120)
            if proc.returncode != 0:
                raise SystemExit(f"importing {name} failed:\n{proc.stderr[-2000:]}")
            out[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["ms"])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parses", type=int, default=15)
    args = parser.parse_args()
    env = airflow_env()
    p = parse_times({"factory": (FACTORY, env), "plain operators": (PLAIN, env),
                     "factory, cluster policy off": (FACTORY, {**env, "AIRFLOW__FINETUNE_GOV__CLUSTER_POLICY": "off"})},
                    "bench_parse", args.parses)
    imports = import_times(args.parses, env)
    print(f"{'measure (fresh interpreters)':<46} {'n':>4} {'p50 ms':>9} {'p95 ms':>9}")
    rows = [(f"DAG parse, {k}", v) for k, v in p.items()] + [(f"import {k}", v) for k, v in imports.items()]
    for label, values in rows:
        print(f"{label:<46} {len(values):>4} {statistics.median(values):>9.1f} {pct(values, 0.95):>9.1f}")
    fac, plain = statistics.median(p["factory"]), statistics.median(p["plain operators"])
    ok = fac - plain <= GOAL_MS and fac / plain <= GOAL_RATIO
    print(f"factory vs plain operators: {fac - plain:+.1f} ms, ratio {fac / plain:.2f}; goal <= +{GOAL_MS:.0f} ms "
          f"and <= {GOAL_RATIO}x: {'PASS' if ok else 'MISS'}")
    print(f"cluster policy check on this DAG: {fac - statistics.median(p['factory, cluster policy off']):+.1f} ms")
    result("DAG parse: governed_finetune factory vs the same plain operators (median)", baseline=plain, ours=fac,
           unit="ms", goal=f"+<= {GOAL_MS:.0f} ms and <= {GOAL_RATIO}x", met=ok, tag="P4")
    return 0


if __name__ == "__main__":
    sys.exit(main())

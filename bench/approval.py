"""Benchmark: policy decision time, and the DAG-parse overhead of the approval gate.

1. Policy decision: ``Policy.decide`` on the packaged default policy for a mix of requests (every
   tier), after one load; the policy load (YAML parse + hash) is reported separately. Goal <= 5 ms
   per decision.
2. Parse overhead: two DAG files of the same shape, one whose gate is ``FineTuneApprovalOperator``
   and one whose gate is Airflow's plain ``HITLOperator`` (the baseline, measured in the same run),
   each parsed with Airflow's DagBag in fresh interpreters (so the provider's import cost counts).
   Goal: median difference <= 20 ms.

    .venv/bin/python bench/approval.py [--decisions N] [--parses N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from airflow_finetune_gov.policy.engine import ChangeRequest, load_policy  # noqa: E402
from bench.common import airflow_env, parse_times, pct, result  # noqa: E402

DECISION_GOAL_MS = 5.0
PARSE_GOAL_MS = 20.0

DAG_TEMPLATE = """
from datetime import timedelta
import pendulum
from airflow.sdk import DAG
from airflow.providers.standard.operators.empty import EmptyOperator
{import_line}

with DAG(dag_id="bench_gate", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    before = EmptyOperator(task_id="policy_check")
    gate = {gate}
    after = EmptyOperator(task_id="acquire_lease")
    before >> gate >> after
"""
GOVERNED = ("from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator",
            'FineTuneApprovalOperator(task_id="approval_gate", response_timeout=timedelta(hours=24))')
BASELINE = ("from airflow.providers.standard.operators.hitl import HITLOperator",
            'HITLOperator(task_id="approval_gate", subject="Approve", options=["Approve", "Reject"], '
            "response_timeout=timedelta(hours=24))")

def bench_decisions(n: int) -> dict[str, float]:
    t = time.perf_counter()
    policy = load_policy()
    load_ms = (time.perf_counter() - t) * 1000
    requests = [
        ChangeRequest(model="m", dataset="public_faq", target_environment="test", requester="requester"),
        ChangeRequest(model="m", dataset="benign", target_environment="staging", requester="requester"),
        ChangeRequest(model="m", dataset="benign", target_environment="production", requester="requester",
                      tuning_method="lora"),
        ChangeRequest(model="m", dataset="poisoned", target_environment="staging", requester="approver1"),
    ]
    times = []
    for i in range(n):
        t = time.perf_counter()
        policy.decide(requests[i % len(requests)])
        times.append((time.perf_counter() - t) * 1000)
    return {"load_ms": load_ms, "p50_ms": statistics.median(times), "p95_ms": pct(times, 0.95)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decisions", type=int, default=20000)
    parser.add_argument("--parses", type=int, default=15)
    args = parser.parse_args()
    env = airflow_env()
    d = bench_decisions(args.decisions)
    p = parse_times({name: (DAG_TEMPLATE.format(import_line=imp, gate=gate), env)
                     for name, (imp, gate) in (("governed", GOVERNED), ("baseline", BASELINE))}, "bench_gate",
                    args.parses)
    gov, base = statistics.median(p["governed"]), statistics.median(p["baseline"])
    overhead = gov - base
    print(f"{'measure':<44} {'n':>6} {'p50 ms':>9} {'p95 ms':>9}")
    print(f"{'policy decision (default policy, 4 requests)':<44} {args.decisions:>6} {d['p50_ms']:>9.4f} "
          f"{d['p95_ms']:>9.4f}")
    print(f"{'policy load (YAML + sha256), once':<44} {1:>6} {d['load_ms']:>9.2f}")
    print(f"{'DAG parse, gate = FineTuneApprovalOperator':<44} {args.parses:>6} {gov:>9.1f} "
          f"{pct(p['governed'], 0.95):>9.1f}")
    print(f"{'DAG parse, gate = HITLOperator (baseline)':<44} {args.parses:>6} {base:>9.1f} "
          f"{pct(p['baseline'], 0.95):>9.1f}")
    print(f"gate parse overhead: {overhead:+.1f} ms (ratio {gov / base:.2f}); goal <= {PARSE_GOAL_MS:.0f} ms: "
          f"{'PASS' if overhead <= PARSE_GOAL_MS else 'MISS'}")
    print(f"policy decision p95 {d['p95_ms']:.4f} ms; goal <= {DECISION_GOAL_MS:.0f} ms: "
          f"{'PASS' if d['p95_ms'] <= DECISION_GOAL_MS else 'MISS'}")
    result("DAG parse, approval gate vs plain HITLOperator (median)", baseline=base, ours=gov, unit="ms",
           goal=f"+<= {PARSE_GOAL_MS:.0f} ms", met=overhead <= PARSE_GOAL_MS, tag="P4")
    result("policy decision p95", baseline=None, ours=d["p95_ms"], unit="ms", goal=f"<= {DECISION_GOAL_MS:.0f} ms",
           met=d["p95_ms"] <= DECISION_GOAL_MS, tag="P4")
    return 0


if __name__ == "__main__":
    sys.exit(main())

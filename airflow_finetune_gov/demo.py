"""The quickstart driver behind ``./scripts/demo``.

Starts the embedded stack, triggers the governed demo DAG as ``requester``, shows that the requester
cannot approve their own change, approves as ``approver1`` over the REST API (or waits for a person
to do it in the UI with ``--manual``), waits for the end and prints the run's lineage. It runs the
benign dataset (promoted) and the poisoned one (blocked by the evaluation) unless told otherwise.
The stack is left running for the UI; ``fgov stack down`` stops it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.stack.client import AirflowClient
from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack, StackOptions
from airflow_finetune_gov.stack.procs import StackError

# Airflow 3.3 can fail a HITL task answered before the scheduler has processed the exit of the
# process that paused it: the executor's late "success" for that process meets the resumed try in
# state queued and the scheduler marks the gate failed (apache/airflow#66374). On a cold worker that
# process took 5.2 s to exit (its supervisor polls at a 5 s heartbeat), so 3 s was not enough. People
# never answer that fast; scripts wait this long after the request appears. It fails closed.
SETTLE_SECONDS = 8.0

EXPECTED = {"benign": "success", "poisoned": "failed"}


def _events(stack: Stack, run_id: str, kind: str) -> list[dict]:
    from airflow_finetune_gov.lineage.store import LineageStore

    state = stack.load() or {}
    events = LineageStore(Path(state["governance_db_url_file"]).read_text()).events(run_id=run_id)
    return [e.payload_dict() for e in events if e.event_type == kind]


def evaluation_summary(stack: Stack, run_id: str) -> str:
    """The run's evaluation verdict as recorded in lineage, one line per metric."""
    done = _events(stack, run_id, "evaluation.completed")
    if not done:
        return "no evaluation recorded"
    e = done[-1]
    lines = [f"verdict {e['verdict']} on {e['prompts']} prompts, {e['flipped']} flipped; report {e['report']}"]
    lines += [f"  {name:<18} {m['baseline']:.1%} -> {m['candidate']:.1%}  difference 95% CI "
              f"[{m['difference_ci'][0]:+.1%}, {m['difference_ci'][1]:+.1%}]  {m['verdict']}"
              for name, m in e["metrics"].items()]
    return "\n   ".join(lines)


def run_one(stack: Stack, dataset: str, environment: str, manual: bool) -> tuple[str, str, float, str]:
    state = stack.load()
    assert state is not None
    url = state["airflow"]["url"]
    requester = AirflowClient(url, "requester", stack.airflow_password("requester"))
    requester.wait_for_dag(DEMO_DAG_ID)
    run_id = requester.trigger(DEMO_DAG_ID, {"dataset": dataset, "target_environment": environment})
    print(f"\n== {dataset} -> {environment}: triggered {run_id} as requester")
    t0 = time.monotonic()
    requester.wait_task_state(DEMO_DAG_ID, run_id, "approval_gate", {"awaiting_input"})
    waiting = time.monotonic() - t0
    decision = _events(stack, run_id, "policy.decided")[-1]
    print(f"   policy: tier {decision['tier']} - {'; '.join(decision['reasons'])}")
    if manual:
        print(f"   approval requested. Open {url}/required_actions and sign in as approver1 or approver2\n"
              f"   (passwords in {state['airflow']['passwords_file']}); the requester cannot approve.")
        human = time.monotonic()
        final = requester.wait_run(DEMO_DAG_ID, run_id, timeout=24 * 3600)
        machine = time.monotonic() - t0 - (time.monotonic() - human)
    else:
        time.sleep(SETTLE_SECONDS)
        own = requester.answer(DEMO_DAG_ID, run_id, "approval_gate", "Approve")
        print(f"   requester approving their own change -> HTTP {own.status_code} (separation of duties)")
        approver = AirflowClient(url, "approver1", stack.airflow_password("approver1"))
        subject = approver.hitl_detail(DEMO_DAG_ID, run_id, "approval_gate")["subject"]
        print(f"   request: {subject}")
        resp = approver.answer(DEMO_DAG_ID, run_id, "approval_gate", "Approve", comment="read the change summary")
        if resp.status_code != 200:
            raise StackError(f"approval as approver1 failed: HTTP {resp.status_code} {resp.text[:200]}")
        print("   approver1 approved over the REST API")
        if decision["tier"] == "quorum":  # the second approval is asked for in a new round of the request
            deadline = time.monotonic() + 120
            while len(_events(stack, run_id, "approval.requested")) < 2:
                if time.monotonic() > deadline:
                    raise StackError("the request's second round never opened")
                time.sleep(0.5)
            requester.wait_task_state(DEMO_DAG_ID, run_id, "approval_gate", {"awaiting_input"})
            time.sleep(SETTLE_SECONDS)
            resp = AirflowClient(url, "approver2", stack.airflow_password("approver2")).answer(
                DEMO_DAG_ID, run_id, "approval_gate", "Approve", comment="second pair of eyes")
            if resp.status_code != 200:
                raise StackError(f"approval as approver2 failed: HTTP {resp.status_code} {resp.text[:200]}")
            print("   approver2 approved too (a quorum: 2 of 2)")
        t1 = time.monotonic()
        final = requester.wait_run(DEMO_DAG_ID, run_id)
        machine = waiting + (time.monotonic() - t1)
    states = requester.task_states(DEMO_DAG_ID, run_id)
    print(f"   run {final}: " + ", ".join(f"{k}={v}" for k, v in states.items()))
    fgov(["--state-dir", str(stack.dir), "lineage", "show", run_id])
    evaluation = evaluation_summary(stack, run_id)
    print(f"   evaluation: {evaluation}")
    return run_id, final, machine, evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.splitlines()[0])
    parser.add_argument("--manual", action="store_true", help="wait for a person to approve in the Airflow UI")
    parser.add_argument("--dataset", choices=["benign", "poisoned", "both"], default="both")
    parser.add_argument("--target-environment", choices=["test", "staging"], default="staging")
    parser.add_argument("--state-dir", default=".fgov")
    args = parser.parse_args(argv)
    stack = Stack(Path(args.state_dir))
    try:
        state = stack.up(StackOptions(state_dir=stack.dir, dags_folder=Path("dags")))
        datasets = ["benign", "poisoned"] if args.dataset == "both" else [args.dataset]
        outcomes = [(ds, *run_one(stack, ds, args.target_environment, args.manual)) for ds in datasets]
    except StackError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 2
    print("\n== summary")
    ok = True
    for ds, _run_id, final, machine, evaluation in outcomes:
        good = final == EXPECTED[ds]
        ok &= good
        note = "promoted" if final == "success" else "blocked before promotion"
        print(f"   {ds:<9} {final:<8} {note:<26} trigger-to-end {machine:.1f}s excluding the human "
              f"({'as expected' if good else 'UNEXPECTED'})")
        print(f"   {'':<9} evaluation: {evaluation.splitlines()[0]}")
    print(f"\nAirflow UI: {state['airflow']['url']}  (users requester, approver1, approver2, auditor; passwords "
          f"in {state['airflow']['passwords_file']})\nThe stack is still running; stop it with "
          f"`.venv/bin/fgov stack down`.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Test-only: the requester's own DAG, whose plain PythonOperator ``forge`` (the cluster policy does not look
at it) tries to approve its run through the control plane, as a DAG author would: it appends the
api-server's witness, a tier-auto decision and a run start (all reserved to the deployment's components), a
grant in approver1's name for the run's real decision (a task may append that under its own key), and asks
the control plane for the dataset's lease role with the forged approval id. It writes what happened, never a
secret, to ``forged_approval.report.json`` beside this file."""

from __future__ import annotations

import json
from pathlib import Path

from airflow.providers.standard.operators.python import PythonOperator
from requesters_dag import requesters_dag

REPORT = Path(__file__).with_name("forged_approval.report.json")


def forge() -> dict:
    from airflow_finetune_gov import common

    plane = common.control()
    decision = plane.call("/v1/lineage/events", {"event_type": "policy.decided"})[-1]["payload"]
    report: dict[str, str] = {}
    attempts = {
        "approval.witnessed": {"responder": "approver1", "chosen_options": ["Approve"],
                               "responded_at": "2026-12-01T00:00:00+00:00"},
        "policy.decided": {**decision, "tier": "auto"},
        "run.started": {"dag_run_id": 1, "start_date": "2026-12-01T00:00:00+00:00"},
        "approval.granted": {"approval_id": "forged", "responder": "approver1", "option": "Approve",
                             "tier": decision["tier"], "policy_sha256": decision["policy_sha256"],
                             "decision_id": decision["decision_id"], "decision_sha256": decision["decision_sha256"]},
    }
    for kind, payload in attempts.items():
        try:
            plane.call("/v1/lineage/append", {"event_type": kind, "payload": payload, "actor": "approver1"})
            report[kind] = "appended"
        except Exception as exc:
            report[kind] = f"refused: {exc}"
    try:
        plane.login("lease-benign", "lease", {"dataset": "benign", "approval_id": "forged"})
        report["lease login"] = "token issued"
    except Exception as exc:
        report["lease login"] = f"refused: {exc}"
    REPORT.write_text(json.dumps(report, indent=2))
    return {k: v.split(":")[0] for k, v in report.items()}


with requesters_dag("forged_approval") as dag:
    forger = PythonOperator(task_id="forge", python_callable=forge)
    dag.get_task("policy_check") >> forger >> dag.get_task("acquire_lease")

"""Test-only: the requester's own DAG, which opens a HITL request of its own beside the governed gate (a
plain ``HITLOperator`` the cluster policy does not look at, with a subject an approver answers without a
second thought) and appends a grant in approver1's name for the run's real decision, as a DAG author
would to turn approver1's answer to the decoy into an approval of the fine-tune."""

from __future__ import annotations

from datetime import timedelta

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.providers.standard.operators.python import PythonOperator
from requesters_dag import requesters_dag


def forge_grant() -> str:
    from airflow_finetune_gov import common

    plane = common.control()
    decision = plane.call("/v1/lineage/events", {"event_type": "policy.decided"})[-1]["payload"]
    plane.call("/v1/lineage/append", {"event_type": "approval.granted", "actor": "approver1", "payload": {
        "approval_id": "decoy", "responder": "approver1", "option": "Approve", "tier": decision["tier"],
        "policy_sha256": decision["policy_sha256"], "decision_id": decision["decision_id"],
        "decision_sha256": decision["decision_sha256"]}})
    return "appended"


with requesters_dag("decoy_request") as dag:
    decoy = HITLOperator(task_id="lunch_order", subject="Approve the team lunch order for Friday",
                         body="Pizza for 12, as every month.", options=["Approve", "Reject"], defaults=None,
                         # unassigned: anyone who reaches the DAG may answer (DAG code cannot read the auth
                         # manager's user ids, which HITL assigns by)
                         execution_timeout=timedelta(minutes=5))
    forger = PythonOperator(task_id="forge_grant", python_callable=forge_grant)
    dag.get_task("policy_check") >> [decoy, forger]

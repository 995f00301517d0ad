"""Roll a model alias back to a version it held before, as a governed change.

    rollback_check (policy) >> approval_gate (Airflow HITL) >> rollback

The policy decides who must approve (default policy: production needs two distinct approvers,
any other environment one; the requester never approves their own change). The rollback moves the
alias only if lineage holds that approval and the version's files still match its manifest, and
refuses if the alias moved since the approval. Everything is recorded in lineage.

Trigger with conf ``{"model": "fgov-demo-tiny", "alias": "staging", "to_version": "<version>"}``.
"""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
from airflow_finetune_gov.registry.operators import RollbackCheckOperator, RollbackModelOperator

with DAG(
    dag_id="governed_rollback",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["finetune-gov", "example"],
    params={"model": Param("fgov-demo-tiny", type="string"),
            "alias": Param("staging", enum=["test", "staging", "production"]),
            "to_version": Param("", type="string", description="A version this alias held before")},
    default_args={"retries": 0},
    doc_md=__doc__,
) as dag:
    check = RollbackCheckOperator(task_id="rollback_check", model="{{ params.model }}", alias="{{ params.alias }}",
                                  to_version="{{ params.to_version }}")
    gate = FineTuneApprovalOperator(task_id="approval_gate", subject="Approve a model rollback",
                                    response_timeout=timedelta(hours=24))
    rollback = RollbackModelOperator(task_id="rollback")
    check >> gate >> rollback

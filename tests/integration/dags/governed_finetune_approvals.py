"""Test-only: the demo chain with a 20-second approval deadline and a promotion that names its alias,
so the tests can let the gate expire and try to promote to an alias the run was not approved for."""

from __future__ import annotations

from datetime import timedelta

import pendulum
from airflow.sdk import DAG, Param

from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
from airflow_finetune_gov.credentials.operators import AcquireLeaseOperator, RevokeLeaseOperator
from airflow_finetune_gov.evaluation.operators import BehaviourEvaluationOperator
from airflow_finetune_gov.policy.operators import PolicyCheckOperator
from airflow_finetune_gov.registry.operators import PromoteModelOperator
from airflow_finetune_gov.tuning.operators import GovernedFineTuneOperator

with DAG(
    dag_id="governed_finetune_approvals",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["finetune-gov", "test"],
    params={"dataset": Param("benign", type="string"), "target_environment": Param("staging", type="string"),
            "promote_alias": Param("", type="string")},
    default_args={"retries": 0},
) as dag:
    policy_check = PolicyCheckOperator(task_id="policy_check", model="fgov-demo-tiny", dataset="{{ params.dataset }}",
                                       target_environment="{{ params.target_environment }}", tuning_method="full")
    approval_gate = FineTuneApprovalOperator(task_id="approval_gate", response_timeout=timedelta(seconds=20))
    acquire_lease = AcquireLeaseOperator(task_id="acquire_lease", expected_duration=60)
    tune = GovernedFineTuneOperator(task_id="tune")
    revoke_lease = RevokeLeaseOperator(task_id="revoke_lease")
    evaluate = BehaviourEvaluationOperator(task_id="evaluate")
    promote = PromoteModelOperator(task_id="promote", alias="{{ params.promote_alias }}")

    policy_check >> approval_gate >> acquire_lease >> tune >> evaluate >> promote
    tune >> revoke_lease.as_teardown(setups=acquire_lease, on_failure_fail_dagrun=True)

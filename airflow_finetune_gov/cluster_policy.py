"""Cluster policy: a DAG that tunes a model without the governed path around it does not load.

For every tuning task (a ``GovernedFineTuneOperator``, or any task passed to :func:`declare_tuning`):

- an approval gate (``FineTuneApprovalOperator``) must be upstream of it, and upstream of its lease;
- a lease setup (``AcquireLeaseOperator`` as a setup task) must be upstream of it, with a
  revocation teardown (``RevokeLeaseOperator``) downstream of it whose setup is that lease;
- every promotion (``PromoteModelOperator``) downstream of it must have an evaluation
  (``BehaviourEvaluationOperator``) between the two.

A violation fails the DAG file's import with ``AirflowClusterPolicyViolation`` naming the DAG, the task
and what is missing. Installing the package registers it through the ``airflow.policy`` entry point;
``[finetune_gov] cluster_policy = off`` turns it off. Or call :func:`check_dag` from your own
``airflow_local_settings.py`` ``dag_policy``.
"""

from __future__ import annotations

from typing import Any

from airflow.policies import hookimpl

TUNING_MARK = "fgov_tuning"


def declare_tuning(task: Any) -> Any:
    """Declare a task of yours (an operator, or a TaskFlow call's result) as a tuning task, so the
    cluster policy holds it to the same rules as ``GovernedFineTuneOperator``. Returns ``task``."""
    operator = getattr(task, "operator", task)
    setattr(operator, TUNING_MARK, True)
    return task


# By class path, so checking a DAG imports nothing: the policy runs on every DAG of the deployment.
KINDS = {
    "airflow_finetune_gov.tuning.operators.GovernedFineTuneOperator": "tuning",
    "airflow_finetune_gov.approval.operators.FineTuneApprovalOperator": "approval",
    "airflow_finetune_gov.credentials.operators.AcquireLeaseOperator": "lease",
    "airflow_finetune_gov.credentials.operators.RevokeLeaseOperator": "revoke",
    "airflow_finetune_gov.evaluation.operators.BehaviourEvaluationOperator": "evaluation",
    "airflow_finetune_gov.registry.operators.PromoteModelOperator": "promotion",
}


def _kind(task: Any) -> str | None:
    if getattr(task, TUNING_MARK, False):
        return "tuning"
    cls = getattr(task, "operator_class", None)  # a mapped task names its class
    if not isinstance(cls, type):
        cls = type(task)
    return next((KINDS[path] for c in cls.__mro__ if (path := f"{c.__module__}.{c.__qualname__}") in KINDS), None)


def check_dag(dag: Any) -> list[str]:
    """The governance violations of ``dag``, one sentence each (empty: it complies)."""
    kinds = {t.task_id: _kind(t) for t in dag.tasks}
    tuning = [t for t in dag.tasks if kinds[t.task_id] == "tuning"]
    if not tuning:
        return []
    problems = []
    for task in tuning:
        up = task.get_flat_relative_ids(upstream=True)
        down = task.get_flat_relative_ids(upstream=False)
        where = f"DAG {dag.dag_id!r}: tuning task {task.task_id!r}"
        approvals = {i for i in up if kinds[i] == "approval"}
        leases = {i for i in up if kinds[i] == "lease" and dag.get_task(i).is_setup}
        if not approvals:
            problems.append(f"{where} has no approval upstream: put a FineTuneApprovalOperator (after the "
                            "PolicyCheckOperator) before it, or build the chain with governed_finetune(...)")
        if not leases:
            problems.append(f"{where} has no credential lease setup upstream: add AcquireLeaseOperator before "
                            "it and mark it as the setup of a RevokeLeaseOperator teardown")
        for lease in sorted(leases):
            if approvals and not approvals & dag.get_task(lease).get_flat_relative_ids(upstream=True):
                problems.append(f"{where}: its lease {lease!r} is not downstream of an approval gate")
        teardowns = [dag.get_task(i) for i in down if kinds[i] == "revoke" and dag.get_task(i).is_teardown]
        for lease in sorted(leases):
            if not any(lease in t.upstream_task_ids for t in teardowns):
                problems.append(f"{where} has no lease revocation teardown downstream for its lease {lease!r}: "
                                f"add {task.task_id} >> RevokeLeaseOperator(...).as_teardown(setups={lease})")
        evaluations = {i for i in down if kinds[i] == "evaluation"}
        for promo in sorted(i for i in down if kinds[i] == "promotion"):
            if not evaluations & dag.get_task(promo).get_flat_relative_ids(upstream=True):
                problems.append(f"{where}: promotion {promo!r} does not come after a behaviour evaluation of "
                                "the tuned model: put a BehaviourEvaluationOperator between them")
    return problems


def enforce(dag: Any) -> None:
    """Raise ``AirflowClusterPolicyViolation`` listing every violation of ``dag``."""
    problems = check_dag(dag)
    if problems:
        from airflow.exceptions import AirflowClusterPolicyViolation

        raise AirflowClusterPolicyViolation("governed fine-tuning policy: " + "; ".join(problems))


@hookimpl
def dag_policy(dag: Any) -> None:
    from airflow_finetune_gov import settings

    if settings.get("cluster_policy", required=False).strip().lower() in ("off", "false", "0", "no"):
        return
    enforce(dag)

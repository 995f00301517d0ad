"""``governed_finetune(...)``: the whole governed chain as one TaskGroup, from small config objects.

    policy_check >> approval_gate >> acquire_lease (setup) >> tune >> evaluate >> promote
                                                               tune >> revoke_lease (teardown)

Works inside ``with DAG(...)`` and ``@dag`` functions, and several chains can sit side by side in one
DAG (each reads only its own lineage events: see :func:`airflow_finetune_gov.common.run_events`).
Every string value may be a Jinja template (``"{{ params.dataset }}"``), rendered per run. The
operators stay usable on their own for other layouts; the cluster policy
(:mod:`airflow_finetune_gov.cluster_policy`) checks either kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow.sdk import TaskGroup


@dataclass(frozen=True)
class Approval:
    """The human gate. Extra ``FineTuneApprovalOperator``/``HITLOperator`` arguments go in ``options``."""

    response_timeout: timedelta | None = timedelta(hours=24)
    subject: str = "Approve a governed fine-tune"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lease:
    """The dataset credential lease: TTL from ``expected_duration`` x 1.5 within the policy's bounds."""

    expected_duration: timedelta | float | str | None = None
    vault_conn_id: str | None = None


@dataclass(frozen=True)
class Tuning:
    """What to tune and how. ``hyperparameters`` are approved with the change and checked again."""

    backend: str = "local_peft"
    base_model: str = "fgov-demo-tiny"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    tuning_method: str = "lora"
    command: list[str] | None = None
    output_model: str | None = None
    backend_kv_path: str | None = None
    deferrable: bool = True
    poll_interval: float | None = None


@dataclass(frozen=True)
class Evaluation:
    """The behaviour evaluation of the tuned model against its base: ``suites`` (names in the governed
    ``evaluation.suites`` table; default the four built-in suites) and/or ``suite_files`` (local
    JSONL/CSV paths, or dicts with ``path``, ``columns``, ``expected_values``, ``name``). A
    ``needs_review`` verdict asks the approvers; ``review_timeout`` fails it closed."""

    suites: tuple[str, ...] = ("harmful", "benign_edgy", "jailbreak", "task_quality")
    suite_files: tuple[str | dict[str, Any], ...] = ()
    review_timeout: timedelta | None = timedelta(hours=24)
    detector: Any = None


@dataclass(frozen=True)
class Promotion:
    """Move the model alias named by the approved target environment (``alias`` must equal it if given)."""

    alias: str | None = None


def governed_finetune(
    group_id: str = "governed_finetune", *,
    dataset: str,
    target_environment: str,
    model: str | None = None,
    approval: Approval | None = None,
    lease: Lease | None = None,
    tuning: Tuning | None = None,
    evaluation: Evaluation | None = Evaluation(),
    promotion: Promotion | None = Promotion(),
    prefix_group_id: bool = True,
    tooltip: str = "",
    justification: str = "{{ params.justification if 'justification' in params else '' }}",
) -> TaskGroup:
    """Build the governed chain for ``dataset`` into ``target_environment`` as a TaskGroup.

    :param model: the model named in the policy request (default: ``tuning.base_model``).
    :param evaluation: ``None`` to leave the tuned model unevaluated; then ``promotion`` must be
        ``None`` too (nothing is promoted without a passing evaluation).
    :param justification: the requester's reason, shown to the approvers (default: the run's
        ``justification`` param, which the requester fills in when triggering).
    :param prefix_group_id: ``False`` keeps task ids unprefixed (``approval_gate``, ``tune``, ...):
        fine for one chain per DAG, and what the quickstart uses.
    """
    from airflow.providers.standard.operators.empty import EmptyOperator
    from airflow.sdk import TaskGroup

    from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
    from airflow_finetune_gov.credentials.operators import AcquireLeaseOperator, RevokeLeaseOperator
    from airflow_finetune_gov.evaluation.operators import BehaviourEvaluationOperator
    from airflow_finetune_gov.policy.operators import PolicyCheckOperator
    from airflow_finetune_gov.registry.operators import PromoteModelOperator
    from airflow_finetune_gov.tuning.operators import GovernedFineTuneOperator

    approval = approval or Approval()
    lease = lease or Lease()
    tuning = tuning or Tuning()
    if promotion is not None and evaluation is None:
        raise ValueError(f"governed_finetune({group_id!r}): promotion needs an evaluation; pass "
                         "promotion=None to tune without promoting, or an Evaluation(...)")
    with TaskGroup(group_id=group_id, prefix_group_id=prefix_group_id,
                   tooltip=tooltip or f"governed fine-tune of {tuning.base_model}") as group:
        check = PolicyCheckOperator(
            task_id="policy_check", model=model or tuning.base_model, dataset=dataset,
            target_environment=target_environment, tuning_method=tuning.tuning_method,
            hyperparameters=tuning.hyperparameters, vault_conn_id=lease.vault_conn_id, justification=justification)
        gate = FineTuneApprovalOperator(task_id="approval_gate", subject=approval.subject,
                                        response_timeout=approval.response_timeout, **approval.options)
        acquire = AcquireLeaseOperator(task_id="acquire_lease", expected_duration=lease.expected_duration,
                                       vault_conn_id=lease.vault_conn_id)
        tune = GovernedFineTuneOperator(
            task_id="tune", lease_task_id=acquire.task_id, backend=tuning.backend, base_model=tuning.base_model,
            hyperparameters=tuning.hyperparameters, command=tuning.command, output_model=tuning.output_model,
            backend_kv_path=tuning.backend_kv_path, deferrable=tuning.deferrable, poll_interval=tuning.poll_interval,
            vault_conn_id=lease.vault_conn_id)
        revoke = RevokeLeaseOperator(task_id="revoke_lease", vault_conn_id=lease.vault_conn_id)
        check >> gate >> acquire >> tune
        last: Any = tune
        if evaluation is not None:
            last = last >> BehaviourEvaluationOperator(
                task_id="evaluate", suites=list(evaluation.suites), suite_files=list(evaluation.suite_files),
                detector=evaluation.detector, response_timeout=evaluation.review_timeout,
                vault_conn_id=lease.vault_conn_id)
        if promotion is not None:
            last = last >> PromoteModelOperator(task_id="promote", alias=promotion.alias,
                                                vault_conn_id=lease.vault_conn_id)
        if last is tune:
            # With on_failure_fail_dagrun=True Airflow counts the teardown as a leaf and not its upstream:
            # without a normal task downstream of tuning, a failed tune behind a successful teardown
            # would leave the run "success".
            tune >> EmptyOperator(task_id="tuned")
        tune >> revoke.as_teardown(setups=acquire, on_failure_fail_dagrun=True)
    return group

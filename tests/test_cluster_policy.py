"""The cluster policy, applied by Airflow's own DagBag through the ``airflow.policy`` entry point."""

from __future__ import annotations

import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

HEADER = '''
from datetime import timedelta
import pendulum
from airflow.sdk import DAG, task
from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
from airflow_finetune_gov.cluster_policy import declare_tuning
from airflow_finetune_gov.credentials.operators import AcquireLeaseOperator, RevokeLeaseOperator
from airflow_finetune_gov.evaluation.operators import BehaviourEvaluationOperator
from airflow_finetune_gov.policy.operators import PolicyCheckOperator
from airflow_finetune_gov.registry.operators import PromoteModelOperator
from airflow_finetune_gov.tuning.operators import GovernedFineTuneOperator

with DAG(dag_id="variant", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")) as dag:
    check = PolicyCheckOperator(task_id="policy_check", model="m", dataset="benign", target_environment="test")
    gate = FineTuneApprovalOperator(task_id="approval_gate", response_timeout=timedelta(hours=1))
    lease = AcquireLeaseOperator(task_id="acquire_lease")
    tune = GovernedFineTuneOperator(task_id="tune")
    revoke = RevokeLeaseOperator(task_id="revoke_lease")
    evaluate = BehaviourEvaluationOperator(task_id="evaluate")
    promote = PromoteModelOperator(task_id="promote")
'''

GOVERNED = '''
    check >> gate >> lease >> tune >> evaluate >> promote
    tune >> revoke.as_teardown(setups=lease)
'''


def load(tmp_path: Path, body: str) -> DagBag:
    (tmp_path / "variant.py").write_text(HEADER + textwrap.indent(textwrap.dedent(body), "    "))
    return DagBag(dag_folder=str(tmp_path))


def violation(bag: DagBag) -> str:
    assert "variant" not in bag.dag_ids
    (error,) = bag.import_errors.values()
    assert "AirflowClusterPolicyViolation" in error or "governed fine-tuning policy" in error, error
    return error


def test_the_policy_is_registered_through_the_entry_point() -> None:
    assert "airflow_finetune_gov.cluster_policy" in {e.value for e in entry_points(group="airflow.policy")}


def test_the_governed_layout_loads(tmp_path: Path) -> None:
    bag = load(tmp_path, GOVERNED)
    assert bag.import_errors == {} and "variant" in bag.dag_ids


def test_no_approval(tmp_path: Path) -> None:
    error = violation(load(tmp_path, '''
        check >> lease >> tune >> evaluate >> promote
        tune >> revoke.as_teardown(setups=lease)
        gate
    '''))
    assert "DAG 'variant': tuning task 'tune' has no approval upstream" in error
    assert "lease" not in error.split("has no approval upstream")[0]  # the lease pair is fine


def test_no_teardown(tmp_path: Path) -> None:
    error = violation(load(tmp_path, '''
        check >> gate >> lease >> tune >> evaluate >> promote
        tune >> revoke  # a plain task, not the lease's teardown
    '''))
    assert "has no credential lease setup upstream" in error  # the lease is no setup without a teardown


def test_teardown_of_another_setup(tmp_path: Path) -> None:
    error = violation(load(tmp_path, '''
        other = AcquireLeaseOperator(task_id="other_lease")
        check >> gate >> other >> lease >> tune >> evaluate >> promote
        tune >> revoke.as_teardown(setups=other)
        lease.as_setup()
    '''))
    assert ("tuning task 'tune' has no lease revocation teardown downstream for its lease 'acquire_lease': "
            "add tune >> RevokeLeaseOperator(...).as_teardown(setups=acquire_lease)") in error
    assert "'other_lease'" not in error


def test_evaluation_after_promotion(tmp_path: Path) -> None:
    error = violation(load(tmp_path, '''
        check >> gate >> lease >> tune >> promote >> evaluate
        tune >> revoke.as_teardown(setups=lease)
    '''))
    assert "promotion 'promote' does not come after a behaviour evaluation" in error


def test_lease_before_the_approval(tmp_path: Path) -> None:
    error = violation(load(tmp_path, '''
        check >> lease >> gate >> tune >> evaluate >> promote
        tune >> revoke.as_teardown(setups=lease)
    '''))
    assert "its lease 'acquire_lease' is not downstream of an approval gate" in error


def test_a_task_declared_as_tuning_is_held_to_the_same_rules(tmp_path: Path) -> None:
    error = violation(load(tmp_path, '''
        @task
        def my_trainer():
            return "trained"

        declare_tuning(my_trainer())
    '''))
    assert "tuning task 'my_trainer' has no approval upstream" in error


def test_it_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__CLUSTER_POLICY", "off")
    bag = load(tmp_path, "check >> lease >> tune")
    assert bag.import_errors == {} and "variant" in bag.dag_ids


def test_checking_a_dag_without_governed_tasks_imports_none_of_the_operators(tmp_path: Path) -> None:
    """The policy runs on every DAG of a deployment: it must not cost the others the provider's imports."""
    import subprocess
    import sys

    (tmp_path / "plain.py").write_text(textwrap.dedent('''
        import pendulum
        from airflow.sdk import DAG
        from airflow.providers.standard.operators.empty import EmptyOperator
        with DAG(dag_id="plain", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
            EmptyOperator(task_id="a")
    '''))
    probe = ("import sys; from airflow.dag_processing.dagbag import DagBag; "
             f"bag = DagBag(dag_folder={str(tmp_path)!r}); assert 'plain' in bag.dag_ids, bag.import_errors; "
             "print(sorted(m for m in sys.modules if m.startswith('airflow_finetune_gov')))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    loaded = out.stdout.strip().splitlines()[-1]
    assert "airflow_finetune_gov.cluster_policy" in loaded  # the policy ran
    assert "operators" not in loaded, loaded

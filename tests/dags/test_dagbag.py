from __future__ import annotations

from itertools import pairwise
from pathlib import Path

from airflow.dag_processing.dagbag import DagBag

DAGS = Path(__file__).resolve().parents[2] / "dags"


def test_example_dags_import_cleanly() -> None:
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    assert "governed_finetune_demo" in bag.dag_ids


def test_demo_dag_shape() -> None:
    dag = DagBag(dag_folder=str(DAGS)).dags.get("governed_finetune_demo")
    assert dag is not None
    order = ["policy_check", "approval_gate", "acquire_lease", "tune", "evaluate", "promote"]
    for up, down in pairwise(order):
        assert down in dag.get_task(up).downstream_task_ids, f"{up} >> {down}"
    lease, revoke = dag.get_task("acquire_lease"), dag.get_task("revoke_lease")
    assert lease.is_setup and revoke.is_teardown
    assert "tune" in revoke.upstream_task_ids
    assert dag.params["dataset"] == "benign" and dag.params["target_environment"] == "staging"

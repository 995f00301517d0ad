from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

DAGS = Path(__file__).resolve().parents[2] / "dags"


EXAMPLES = {"governed_finetune_demo", "governed_example_command", "governed_example_openai",
            "governed_example_mapped", "fgov_lease_sweep", "governed_rollback"}


def test_example_dags_import_cleanly() -> None:
    bag = DagBag(dag_folder=str(DAGS))  # the cluster policy runs here too: every example complies
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == EXAMPLES


def test_example_chains() -> None:
    bag = DagBag(dag_folder=str(DAGS))
    command = bag.dags["governed_example_command"]
    tune = command.get_task("command_trainer.tune")
    assert tune.backend == "command" and tune.command[1:] == ["-m", "airflow_finetune_gov.tuning.trainer"]
    assert "command_trainer.evaluate" in tune.downstream_task_ids
    openai = bag.dags["governed_example_openai"]
    assert openai.get_task("openai.tune").backend == "openai_compatible"
    assert {t.task_id for t in openai.tasks} >= {"openai.revoke_lease", "openai.evaluate", "openai.promote"}
    assert "openai.evaluate" in openai.get_task("openai.tune").downstream_task_ids
    mapped = bag.dags["governed_example_mapped"]
    promote = mapped.get_task("per_dataset.chain.promote")
    assert promote.get_closest_mapped_task_group() is not None  # one chain per dataset, expanded at run time
    assert mapped.get_task("per_dataset.chain.acquire_lease").is_setup
    assert bag.dags["fgov_lease_sweep"].get_task("sweep") is not None


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


def test_a_malformed_policy_file_fails_the_dag_at_parse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from airflow_finetune_gov.policy.engine import default_policy_text

    broken = tmp_path / "team-policy.yaml"
    broken.write_text(default_policy_text().replace("tier: auto", "tier: sometimes"))
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__POLICY_FILE", str(broken))
    bag = DagBag(dag_folder=str(DAGS / "governed_finetune_demo.py"))
    assert "governed_finetune_demo" not in bag.dag_ids
    (error,) = bag.import_errors.values()
    line = next(n for n, text in enumerate(broken.read_text().splitlines(), 1) if "sometimes" in text)
    assert f"{broken}, line {line}: tier 'sometimes' is not one of" in error

"""governed_finetune(): the shape it builds, in @dag and classic DAGs (run on the stack by the demo,
example and test DAGs that use it)."""

from __future__ import annotations

from datetime import timedelta
from itertools import pairwise

import pendulum
import pytest
from airflow.sdk import DAG, dag

from airflow_finetune_gov.cluster_policy import check_dag
from airflow_finetune_gov.factory import Evaluation, Lease, Tuning, governed_finetune
from airflow_finetune_gov.lineage.store import chain_of as chain

START = pendulum.datetime(2026, 1, 1, tz="UTC")
ORDER = ["policy_check", "approval_gate", "acquire_lease", "tune", "evaluate", "promote"]


def assert_chain(d, prefix: str) -> None:
    for up, down in pairwise(ORDER):
        assert f"{prefix}{down}" in d.get_task(f"{prefix}{up}").downstream_task_ids, f"{up} >> {down}"
    lease, revoke = d.get_task(f"{prefix}acquire_lease"), d.get_task(f"{prefix}revoke_lease")
    assert lease.is_setup and revoke.is_teardown and f"{prefix}tune" in revoke.upstream_task_ids
    assert check_dag(d) == []


def test_in_a_dag_decorated_function_with_two_chains_side_by_side() -> None:
    @dag(dag_id="two_chains", schedule=None, start_date=START)
    def two_chains() -> None:
        for ds in ("benign", "public_faq"):
            governed_finetune(f"tune_{ds}", dataset=ds, target_environment="test",
                              tuning=Tuning(hyperparameters={"epochs": 2}))

    d = two_chains()
    assert_chain(d, "tune_benign.")
    assert_chain(d, "tune_public_faq.")
    assert d.get_task("tune_benign.policy_check").dataset == "benign"
    assert d.get_task("tune_public_faq.tune").hyperparameters == {"epochs": 2}
    assert d.get_task("tune_public_faq.policy_check").hyperparameters == {"epochs": 2}  # approved as asked
    # each chain reads only its own lineage events
    assert chain("tune_benign.tune", -1) == chain("tune_benign.revoke_lease", -1) != chain("tune_public_faq.tune", -1)
    assert chain("tune", 0) != chain("tune", 1) and chain("tune", -1) == ("", -1)


def test_classic_dag_unprefixed_with_templated_values() -> None:
    with DAG(dag_id="classic", schedule=None, start_date=START) as d:
        governed_finetune(dataset="{{ params.dataset }}", target_environment="{{ params.env }}",
                          lease=Lease(expected_duration=60), prefix_group_id=False)
    assert_chain(d, "")
    assert d.get_task("policy_check").target_environment == "{{ params.env }}"
    assert d.get_task("acquire_lease").expected_duration == 60


def test_without_evaluation_and_promotion_a_task_still_follows_tuning() -> None:
    with DAG(dag_id="tune_only", schedule=None, start_date=START) as d:
        governed_finetune(dataset="benign", target_environment="test", evaluation=None, promotion=None)
    assert d.get_task("governed_finetune.tuned").upstream_task_ids == {"governed_finetune.tune"}
    assert not any(t.task_id.endswith(("evaluate", "promote")) for t in d.tasks)


def test_promotion_without_evaluation_is_refused() -> None:
    with DAG(dag_id="bad", schedule=None, start_date=START), \
            pytest.raises(ValueError, match="promotion needs an evaluation"):
        governed_finetune(dataset="benign", target_environment="test", evaluation=None)


def test_evaluation_suites_and_review_timeout_are_passed_through() -> None:
    with DAG(dag_id="suite", schedule=None, start_date=START) as d:
        governed_finetune(dataset="benign", target_environment="test", evaluation=Evaluation(
            suites=("harmful",), suite_files=("/s.jsonl", {"path": "/x.csv", "name": "x"}),
            review_timeout=timedelta(hours=2)))
        governed_finetune("other", dataset="benign", target_environment="test")
    task = d.get_task("governed_finetune.evaluate")
    assert task.suites == ["harmful"] and task.suite_files == ["/s.jsonl", {"path": "/x.csv", "name": "x"}]
    assert task.response_timeout == timedelta(hours=2) and task.defaults is None  # a timeout never accepts
    assert d.get_task("other.evaluate").suites == ["harmful", "benign_edgy", "jailbreak", "task_quality"]


def test_an_evaluation_with_no_suites_is_an_error() -> None:
    with DAG(dag_id="nosuite", schedule=None, start_date=START), pytest.raises(ValueError, match="give suites"):
        governed_finetune(dataset="benign", target_environment="test", evaluation=Evaluation(suites=()))

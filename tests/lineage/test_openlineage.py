"""OpenLineage facets built from the lineage record (SQLite: pure logic), and the operators that carry them."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import payloads
import pytest

from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
from airflow_finetune_gov.credentials.operators import AcquireLeaseOperator, RevokeLeaseOperator
from airflow_finetune_gov.evaluation.operators import BehaviourEvaluationOperator
from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage import openlineage as ol
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageError, LineageEvent, LineageStore, create_schema
from airflow_finetune_gov.policy.operators import PolicyCheckOperator
from airflow_finetune_gov.registry.operators import PromoteModelOperator, RollbackModelOperator
from airflow_finetune_gov.tuning.operators import GovernedFineTuneOperator

SHA, BASE_SHA, OUT_SHA, SUITE_SHA, POLICY_SHA = "ab" * 32, "cd" * 32, "ef" * 32, "12" * 32, "f" * 64
URI = "postgresql://db.internal:5433/fgov_datasets/datasets.benign"
STORE = "/srv/models"
G = "fg."  # the governed_finetune task group


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    return s


def rec(store: LineageStore, task: str, kind: str, payload: dict[str, Any], *, run: str = "r", try_number: int = 1,
        group: str = G, map_index: int = -1) -> None:
    events.record(store, EventKey("d", run, f"{group}{task}", try_number, map_index), kind, actor="t", payload=payload)


def decided(store: LineageStore, **kw: Any) -> dict[str, Any]:
    d = payloads.decision("production", uri=URI, hyperparameters={"epochs": 2}, policy_sha256=POLICY_SHA)
    rec(store, "policy_check", "policy.decided", d, **kw)
    rec(store, "approval_gate", "approval.requested", payloads.requested(d), **kw)
    return d


def governed_run(store: LineageStore, *, verdict: str = "pass", group: str = G, map_index: int = -1) -> None:
    def r(task: str, kind: str, payload: dict[str, Any]) -> None:
        rec(store, task, kind, payload, group=group, map_index=map_index)

    d = decided(store, group=group, map_index=map_index)
    for who in ("approver1", "approver2"):
        r("approval_gate", "approval.witnessed", payloads.witnessed(who))
        r("approval_gate", "approval.granted", payloads.grant(d, who))
    r("approval_gate", "approval.decided", {"outcome": "approved", "approvers": ["approver1", "approver2"]})
    lease = "database/creds/train/L1"
    r("acquire_lease", "lease.issued", payloads.issued(lease))
    r("tune", "tuning.started", payloads.tuning_started(hyperparameters={"epochs": 2}))
    r("tune", "tuning.completed", payloads.tuned(
        "v1", lease_id=lease, db_role="v-train-L1", base_sha256=BASE_SHA, output_sha256=OUT_SHA, remote_model=None,
        kind="adapter", metrics={"loss": 0.1}, hyperparameters={"epochs": 2}))
    r("revoke_lease", "lease.revoked", payloads.revoked(lease))
    r("revoke_lease", "lease.verified", payloads.verified(lease))
    r("evaluate", "evaluation.started", payloads.evaluation_started("e1", suites={"harmful": SUITE_SHA,
                                                                                  "benign": SHA}))
    r("evaluate", "evaluation.completed", payloads.evaluated(verdict, "v1", model="m"))
    if verdict == "pass":
        r("promote", "provenance.verified", payloads.provenance_verified("v1", invocation_id="d/r"))
        r("promote", "promotion.completed", payloads.promoted(
            "production", "v1", previous="v0", approval_id="a-approver2", approvers=["approver1", "approver2"]))
    else:
        r("promote", "promotion.blocked", {"reason": f"evaluation verdict {verdict}"})


def plan_for(store: LineageStore, task: str, step: str | None, *, try_number: int = 1, map_index: int = -1,
             group: str = G) -> ol.LineagePlan:
    events = ol.chain_events(store, "d", "r", f"{group}{task}", map_index)
    return ol.plan(events, step, run_id="r", task_id=f"{group}{task}", try_number=try_number, model_store=STORE)


def names(refs: list[ol.DatasetRef]) -> list[tuple[str, str, str | None]]:
    return [(d.namespace, d.name, d.version) for d in refs]


def test_tuning_reads_the_approved_table_and_writes_the_model_version(store: LineageStore) -> None:
    governed_run(store)
    p = plan_for(store, "tune", "tuning")
    assert names(p.inputs) == [("postgres://db.internal:5433", "fgov_datasets.datasets.benign", SHA),
                               ("file", f"{STORE}/fgov-demo-tiny/b1", "b1")]
    assert p.inputs[0].attributes == {"sha256": SHA, "rows": 12}
    assert p.inputs[1].attributes["sha256"] == BASE_SHA
    assert names(p.outputs) == [("file", f"{STORE}/m/v1", "v1")]
    assert p.outputs[0].attributes == {"name": "m", "version": "v1", "sha256": OUT_SHA}


def test_the_governance_facet_carries_the_record(store: LineageStore) -> None:
    governed_run(store)
    g = plan_for(store, "promote", "promotion").governance
    assert g["policy"]["tier"] == "quorum" and g["policy"]["sha256"] == POLICY_SHA
    assert g["policy"]["requester"] == "requester" and g["policy"]["targetEnvironment"] == "production"
    assert g["approval"] == {"status": "granted", "approvalId": "a-approver2", "tier": "quorum",
                             "approvers": ["approver1", "approver2"]}
    assert g["leases"] == [{"leaseId": "database/creds/train/L1", "purpose": "training", "dataset": "benign",
                            "dbRole": "v-train-L1", "status": "verified", "renewals": 0}]
    assert g["tuning"]["status"] == "completed" and g["tuning"]["sha256"] == OUT_SHA
    assert g["tuning"]["datasetSha256"] == SHA
    assert g["evaluation"]["verdict"] == "pass" and g["evaluation"]["suites"] == {"harmful": SUITE_SHA, "benign": SHA}
    assert g["promotion"]["status"] == "completed" and g["promotion"]["alias"] == "production"
    assert g["promotion"]["provenance"] == "verified"
    recorded = store.events(run_id="r")
    assert g["lineage"] == {"events": 16, "lastEventId": recorded[-1].id, "lastEventHash": recorded[-1].hash}
    assert len(recorded) == 16
    # field by field, never whole payloads: the token accessors and wrapping digest stay in the record
    text = json.dumps(g)
    assert "acc-L1" not in text and "wacc-L1" not in text and "loss" not in text


def test_an_ungranted_or_blocked_run_says_so(store: LineageStore) -> None:
    d = decided(store)
    rec(store, "approval_gate", "approval.witnessed", payloads.witnessed("approver1"))
    rec(store, "approval_gate", "approval.granted", payloads.grant(d, "approver1", approval_id="a1"))
    assert plan_for(store, "approval_gate", "approval").governance["approval"]["status"] == "pending"
    rec(store, "approval_gate", "approval.granted", payloads.grant(d, "requester", approval_id="a2"))
    g = plan_for(store, "approval_gate", "approval").governance
    assert g["approval"]["status"] == "pending" and "needs 2 distinct approver(s)" in g["approval"]["reason"]
    rec(store, "approval_gate", "approval.rejected", payloads.rejection(d, "approver2"))
    rec(store, "approval_gate", "approval.decided", {"outcome": "rejected", "reason": "rejected by approver2"})
    g = plan_for(store, "approval_gate", "approval").governance
    assert g["approval"] == {"status": "rejected", "reason": "rejected by approver2"}


def test_a_failed_evaluation_and_blocked_promotion(store: LineageStore) -> None:
    governed_run(store, verdict="fail")
    p = plan_for(store, "promote", "promotion")
    assert p.governance["evaluation"]["verdict"] == "fail"
    assert p.governance["promotion"] == {"status": "blocked", "reason": "evaluation verdict fail"}
    assert names(p.inputs) == [("file", f"{STORE}/m/v1", "v1")] and p.outputs == []


def test_each_step_reports_what_it_reads_and_writes(store: LineageStore) -> None:
    governed_run(store)
    assert names(plan_for(store, "policy_check", "policy").inputs) == [
        ("postgres://db.internal:5433", "fgov_datasets.datasets.benign", SHA)]
    for task, step in (("approval_gate", "approval"), ("acquire_lease", "lease"), ("revoke_lease", "lease")):
        p = plan_for(store, task, step)
        assert (p.inputs, p.outputs) == ([], []) and p.governance["policy"]["tier"] == "quorum"
    ev = plan_for(store, "evaluate", "evaluation")
    assert names(ev.inputs) == [("file", f"{STORE}/fgov-demo-tiny/b1", "b1"), ("file", f"{STORE}/m/v1", "v1"),
                                (ol.SUITES_NAMESPACE, "benign", SHA), (ol.SUITES_NAMESPACE, "harmful", SUITE_SHA)]
    assert ev.outputs == []
    promo = plan_for(store, "promote", "promotion")
    assert names(promo.outputs) == [("file", f"{STORE}/m/v1", "v1")]
    assert promo.outputs[0].attributes == {"name": "m", "version": "v1", "sha256": OUT_SHA, "alias": "production",
                                           "previousVersion": "v0"}


def test_before_it_reads_tuning_reports_the_approved_table_and_no_output(store: LineageStore) -> None:
    decided(store)
    p = plan_for(store, "tune", "tuning")
    assert names(p.inputs) == [("postgres://db.internal:5433", "fgov_datasets.datasets.benign", SHA)]
    assert p.outputs == [] and p.governance["tuning"] is None


def test_a_retry_does_not_report_the_previous_try_output_as_its_own(store: LineageStore) -> None:
    governed_run(store)
    assert plan_for(store, "tune", "tuning", try_number=2).outputs == []
    assert plan_for(store, "promote", "promotion", try_number=2).outputs == []


def test_chains_of_one_run_are_kept_apart(store: LineageStore) -> None:
    governed_run(store, group="per.chain.", map_index=0)
    decided(store, group="per.chain.", map_index=1)
    p = plan_for(store, "promote", "promotion", group="per.chain.", map_index=1)
    assert p.governance["promotion"] is None and p.governance["tuning"] is None and p.inputs == []
    assert plan_for(store, "promote", "promotion", group="per.chain.", map_index=0).governance["promotion"]


def test_a_rollback_reports_the_alias_it_moved(store: LineageStore) -> None:
    rec(store, "rollback_model", "rollback.completed", {"model": "m", "alias": "production", "version": "v0",
                                                        "previous": "v1", "approval_id": "a9",
                                                        "approvers": ["approver1"]}, group="")
    p = plan_for(store, "rollback_model", "rollback", group="")
    assert names(p.outputs) == [("file", f"{STORE}/m/v0", "v0")]
    assert p.governance["rollback"]["status"] == "completed" and p.governance["rollback"]["previousVersion"] == "v1"


def test_a_remote_fine_tune_is_named_by_its_api(store: LineageStore) -> None:
    decided(store)
    rec(store, "tune", "tuning.submitted", events.TUNING_SUBMITTED.payload(
        backend="openai_compatible", remote_job_id="ftjob-1", api_base="http://127.0.0.1:8011/v1",
        content_sha256=SHA, dataset="benign", deferred=True, kv_path="openai"))
    rec(store, "tune", "tuning.completed", payloads.tuned(
        None, backend="openai_compatible", base_model="gpt-x", base_version=None, model="gpt-x", output_sha256=None,
        remote_model="ft:gpt-x:1", kind="remote"))
    p = plan_for(store, "tune", "tuning")
    assert names(p.outputs) == [("http://127.0.0.1:8011", "ft:gpt-x:1", None)]
    assert p.outputs[0].attributes["remoteModel"] == "ft:gpt-x:1" and len(p.inputs) == 1


def test_credentials_in_a_dataset_uri_are_dropped() -> None:
    ref = ol.table_dataset("postgresql://svc:hunter2@db:5432/fgov_datasets/datasets.benign", SHA, 3)
    assert (ref.namespace, ref.name) == ("postgres://db:5432", "fgov_datasets.datasets.benign")
    assert "hunter2" not in json.dumps(ref.__dict__)


def _event(event_type: str, payload: dict[str, Any], task: str = f"{G}evaluate") -> LineageEvent:
    """An event as a tampered or foreign store could return it: the store itself refuses secret keys on
    write, so these never come from ``LineageStore.record``."""
    return LineageEvent(id=1, dag_id="d", run_id="r", task_id=task, try_number=1, map_index=-1,
                        event_type=event_type, actor="t", created_at="2026-01-01", payload=json.dumps(payload),
                        prev_run_hash=None, prev_hash=None, hash="0" * 64)


@pytest.mark.parametrize(("event_type", "payload"), [
    ("evaluation.started", {"evaluation_id": "e1", "suites": {"db_password": SHA}}),
    ("policy.decided", {"tier": "auto", "policy_sha256": POLICY_SHA, "reasons": [{"client_token": "s.x"}],
                        "request": {}}),
])
def test_a_secret_looking_key_is_refused(event_type: str, payload: dict[str, Any]) -> None:
    with pytest.raises(LineageError, match="lineage never stores secrets"):
        ol.plan([_event(event_type, payload)], "evaluation", run_id="r", task_id=f"{G}evaluate", try_number=1,
                model_store=STORE)


def test_the_facets_go_out_through_the_file_transport(store: LineageStore, tmp_path) -> None:
    """Emitted with the OpenLineage client's file transport (what the README configures), read back."""
    from openlineage.client import OpenLineageClient
    from openlineage.client.event_v2 import Job, Run, RunEvent, RunState

    governed_run(store)
    lineage = ol.to_operator_lineage(plan_for(store, "tune", "tuning"))
    out = tmp_path / "openlineage.jsonl"
    client = OpenLineageClient(config={"transport": {"type": "file", "log_file_path": str(out), "append": True}})
    client.emit(RunEvent(eventType=RunState.COMPLETE, eventTime="2026-01-01T00:00:00Z",
                         run=Run(runId="01890000-0000-7000-8000-000000000000", facets=lineage.run_facets),
                         job=Job(namespace="default", name="d.fg.tune"), inputs=lineage.inputs,
                         outputs=lineage.outputs))
    [doc] = [json.loads(line) for line in out.read_text().splitlines()]
    facet = doc["run"]["facets"][ol.GOVERNANCE_FACET]
    assert facet["_schemaURL"] == ol.SCHEMA_URN + "GovernanceRunFacet" and facet["_producer"]
    assert facet["approval"]["approvers"] == ["approver1", "approver2"]
    assert facet["policy"]["sha256"] == POLICY_SHA
    table = doc["inputs"][0]
    assert table["namespace"] == "postgres://db.internal:5433"
    assert table["facets"]["version"]["datasetVersion"] == SHA and table["facets"]["fgovContent"]["rows"] == 12
    assert doc["outputs"][0]["facets"]["fgovModel"]["sha256"] == OUT_SHA


OPERATORS = [PolicyCheckOperator, FineTuneApprovalOperator, AcquireLeaseOperator, RevokeLeaseOperator,
             GovernedFineTuneOperator, BehaviourEvaluationOperator, PromoteModelOperator, RollbackModelOperator]


@pytest.mark.parametrize("cls", OPERATORS, ids=lambda c: c.__name__)
def test_each_governed_operator_implements_the_openlineage_methods(cls: type) -> None:
    assert issubclass(cls, ol.GovernedOpenLineageMixin) and ol.step_of(cls) is not None
    for name in ("get_openlineage_facets_on_start", "get_openlineage_facets_on_complete",
                 "get_openlineage_facets_on_failure"):
        assert getattr(cls, name) is getattr(ol.GovernedOpenLineageMixin, name)


def test_the_provider_extractor_gets_the_facets_from_the_operator(store: LineageStore, tmp_path, monkeypatch) -> None:
    """Through the OpenLineage provider's own DefaultExtractor, as its listener calls it (it swallows
    errors and returns None, so a broken method shows up here)."""
    from airflow.providers.openlineage.extractors.base import DefaultExtractor

    governed_run(store)
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__GOVERNANCE_DB_URL", str(store.engine.url))
    monkeypatch.setenv("AIRFLOW__FINETUNE_GOV__MODEL_STORE", STORE)
    task = GovernedFineTuneOperator(task_id="tune")
    ti = SimpleNamespace(dag_id="d", run_id="r", task_id=f"{G}tune", try_number=1, map_index=-1)
    done = DefaultExtractor(task).extract_on_complete(ti)
    assert done is not None
    assert [d.name for d in done.outputs] == [f"{STORE}/m/v1"]
    assert done.run_facets[ol.GOVERNANCE_FACET].tuning["status"] == "completed"
    failed = DefaultExtractor(task).extract_on_failure(ti)
    assert failed is not None and failed.run_facets[ol.GOVERNANCE_FACET].leases[0]["status"] == "verified"


BLOCK_OPENLINEAGE = """
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "openlineage" or name.startswith("openlineage."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Absent())
"""


def test_the_operators_work_without_the_openlineage_client() -> None:
    """The client is imported only inside the OpenLineage methods: without it, the operators import and
    the facets can still be planned."""
    code = BLOCK_OPENLINEAGE + (
        "import airflow_finetune_gov.tuning.operators, airflow_finetune_gov.evaluation.operators, "
        "airflow_finetune_gov.policy.operators, airflow_finetune_gov.approval.operators, "
        "airflow_finetune_gov.credentials.operators\n"
        "from airflow_finetune_gov.lineage import openlineage as ol\n"
        "ol.plan([], 'tuning', run_id='r', task_id='t', try_number=1, model_store='m')\n"
        "print(sorted(m for m in sys.modules if m.startswith(('openlineage', 'airflow.providers.openlineage.'))))\n"
        "try:\n"
        "    ol.to_operator_lineage(ol.LineagePlan())\n"
        "except ModuleNotFoundError as exc:\n"
        "    print('client needed only here:', exc.name)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    # Airflow itself reads every installed provider's get_provider_info; nothing else of OpenLineage loads
    loaded, needed = out.stdout.splitlines()[-2:]
    assert set(ast.literal_eval(loaded)) <= {"airflow.providers.openlineage.get_provider_info"}, out.stdout
    assert needed == "client needed only here: openlineage", out.stdout


LISTENER_DAG = '''
import pendulum
from airflow.sdk import DAG, TaskGroup
from airflow_finetune_gov.approval.operators import FineTuneApprovalOperator
from airflow_finetune_gov.policy.operators import PolicyCheckOperator

with DAG("ol_listener", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")), TaskGroup("fg"):
    PolicyCheckOperator(task_id="policy_check", model="m", dataset="public_faq", target_environment="test",
                        dataset_digest=False) >> FineTuneApprovalOperator(task_id="approval_gate")
'''


def test_the_airflow_openlineage_listener_emits_the_facets(tmp_path) -> None:
    """A real `airflow dags test` with the OpenLineage provider's file transport: the listener calls the
    mixin (START in a forked process, FAIL after) and the governance facet goes out. ``dags test`` has no
    scheduler, so no ``run.started`` witnesses the run and the policy check refuses to decide anything
    (tier ``auto`` otherwise: public data into ``test``, no human, no OpenBao, no dataset digest)."""
    (tmp_path / "dags").mkdir()
    (tmp_path / "dags" / "ol_listener.py").write_text(LISTENER_DAG)
    create_schema(f"sqlite:///{tmp_path / 'gov.db'}")
    events_file = tmp_path / "ol.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "OPENLINEAGE"))}
    env.update({
        "AIRFLOW_HOME": str(tmp_path / "home"), "AIRFLOW__CORE__DAGS_FOLDER": str(tmp_path / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{tmp_path / 'airflow.db'}",
        "AIRFLOW__FINETUNE_GOV__GOVERNANCE_DB_URL": f"sqlite:///{tmp_path / 'gov.db'}",
        "AIRFLOW__FINETUNE_GOV__MODEL_STORE": str(tmp_path / "models"),
        "AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps({"type": "file", "log_file_path": str(events_file),
                                                       "append": True}),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    })
    airflow = str(Path(sys.executable).parent / "airflow")
    done = subprocess.run([airflow, "db", "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    done = subprocess.run([airflow, "dags", "test", "ol_listener"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 1 and "has no run.started record from the scheduler" in done.stdout, done.stdout[-3000:]
    events = [json.loads(line) for line in events_file.read_text().splitlines()]
    by = {(e["job"]["name"], e["eventType"]): e["run"]["facets"] for e in events}
    assert by[("ol_listener.fg.policy_check", "START")][ol.GOVERNANCE_FACET]["lineage"] == {"events": 0}
    failed = by[("ol_listener.fg.policy_check", "FAIL")][ol.GOVERNANCE_FACET]
    assert failed["lineage"] == {"events": 0} and failed.get("policy") is None
    assert ("ol_listener.fg.approval_gate", "START") not in by
    assert LineageStore(f"sqlite:///{tmp_path / 'gov.db'}").events() == []  # nothing was decided

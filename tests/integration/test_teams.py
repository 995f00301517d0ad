"""Two teams on one deployment (the packaged policy's ``support`` and ``research``, the stack's FAB roles): each
team's members reach only the team's DAGs, its runs lease only the team's data, and only the team's approvers
approve them; the auditor reads both and changes nothing. Every step is a real user over Airflow's REST API."""

from __future__ import annotations

import pytest
import requests
from support import StackView

from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack
RESEARCH_DAG = "research_tune"
SUPPORT_INPUTS_DAG = "governed_finetune_inputs"


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


def governance(view: StackView, user: str, path: str) -> requests.Response:
    return view.client(user).session.get(view.state["airflow"]["url"] + "/fgov" + path, timeout=30)


@pytest.fixture(scope="module")
def research_run(view: StackView) -> str:
    """A research run waiting for its approvers (a base no screening can load: quorum)."""
    run_id = view.trigger(RESEARCH_DAG, as_user="researcher")
    view.wait_round(RESEARCH_DAG, run_id, 1, as_user="researcher")
    return run_id


def test_a_teams_run_is_asked_of_its_teams_approvers_only(view: StackView, research_run: str) -> None:
    (decided,) = [e.payload_dict() for e in view.events(research_run, "policy.decided")]
    assert (decided["team"], decided["tier"]) == ("research", "quorum"), decided
    assert decided["approvers"] == ["research-approver", "research-approver2"]
    assert view.events(research_run, "approval.requested")[0].payload_dict()["assigned"] == decided["approvers"]
    # support's approvers cannot answer it: Airflow does not let them reach the DAG, and nothing is witnessed
    for user in ("approver1", "approver2"):
        view.answer(RESEARCH_DAG, research_run, user, "Approve", "not my team's", status=403)
    # the auditor reads it and cannot answer it either
    view.answer(RESEARCH_DAG, research_run, "auditor", "Approve", "auditing", status=403)
    assert view.events(research_run, "approval.witnessed") == []


def test_team_members_see_their_teams_runs_only_and_the_auditor_sees_both(view: StackView,
                                                                         research_run: str) -> None:
    path = f"/api/runs/{RESEARCH_DAG}/{research_run}"
    assert governance(view, "researcher", path).status_code == 200
    assert governance(view, "auditor", path).status_code == 200
    for user in ("requester", "approver1"):
        denied = governance(view, user, path)
        assert denied.status_code == 403 and RESEARCH_DAG in denied.json()["detail"], denied.text
        assert view.client(user).request("GET", f"/dags/{RESEARCH_DAG}").status_code == 403  # Airflow's own
        listed = governance(view, user, "/api/runs").json()["runs"]
        assert research_run not in {r["run_id"] for r in listed}
        assert governance(view, user, f"/ui/runs/{RESEARCH_DAG}/{research_run}").status_code == 403
    assert research_run in {r["run_id"] for r in governance(view, "auditor", "/api/runs").json()["runs"]}
    # and the other way round: research reads none of support's runs
    assert governance(view, "researcher", f"/api/runs/{DEMO_DAG_ID}/any-run").status_code == 403
    assert view.client("researcher").request("GET", f"/dags/{DEMO_DAG_ID}").status_code == 403
    # the auditor changes nothing: no trigger of either team's DAG
    for dag_id in (RESEARCH_DAG, DEMO_DAG_ID):
        resp = view.client("auditor").request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None})
        assert resp.status_code == 403, resp.text


def test_the_teams_approvers_approve_and_its_run_leases_its_own_data(view: StackView, research_run: str) -> None:
    view.answer(RESEARCH_DAG, research_run, "research-approver", "Approve", "notes are ours")
    view.wait_round(RESEARCH_DAG, research_run, 2, as_user="researcher")
    view.answer(RESEARCH_DAG, research_run, "research-approver2", "Approve", "ok")
    researcher = view.client("researcher")
    assert researcher.wait_run(RESEARCH_DAG, research_run, timeout=300) == "success", \
        researcher.task_states(RESEARCH_DAG, research_run)
    (lease,) = [e.payload_dict() for e in view.events(research_run, "lease.issued") if e.task_id == "acquire_lease"]
    assert lease["dataset"] == "research_notes", lease
    (decided,) = [e.payload_dict() for e in view.events(research_run, "approval.decided")]
    assert decided["approvers"] == ["research-approver", "research-approver2"]
    # the model it made is on research's model page, and support's people do not read it there
    assert governance(view, "researcher", "/api/models/research-tuned").status_code == 200
    assert governance(view, "requester", "/api/models/research-tuned").status_code == 404


@pytest.mark.parametrize(("user", "dag_id", "conf", "team", "reason"), [
    ("requester", SUPPORT_INPUTS_DAG, {"dataset": "research_notes"}, "support",
     "dataset research_notes is team research's, not team support's"),
    ("researcher", RESEARCH_DAG, {"model": "fgov-demo-tiny"}, "research",
     "model fgov-demo-tiny is team support's, not team research's"),
], ids=["support-leasing-research-data", "research-tuning-supports-model"])
def test_a_run_cannot_use_another_teams_data_or_change_its_model(view: StackView, user: str, dag_id: str,
                                                                 conf: dict[str, str], team: str, reason: str) -> None:
    """A team's requester names the other team's dataset, or model, in their own DAG: denied before anyone is
    asked and before any credential (the screening's and the digest's included) is issued."""
    run_id = view.trigger(dag_id, as_user=user, **conf)
    client = view.client(user)
    assert client.wait_run(dag_id, run_id, timeout=300) == "failed"
    assert client.task_states(dag_id, run_id)["policy_check"] == "failed"
    (decided,) = [e.payload_dict() for e in view.events(run_id, "policy.decided")]
    assert (decided["team"], decided["tier"]) == (team, "deny"), decided
    assert reason in decided["reasons"][0], decided["reasons"]
    assert view.events(run_id, "lease.issued") == [] and view.events(run_id, "approval.requested") == []

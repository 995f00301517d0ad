"""The trust boundary, measured: a probe in a DAG the requester commits, at parse time and as a plain
PythonOperator task, searches everything it can read for credentials and tries them against PostgreSQL,
OpenBao and the Airflow API (tests/integration/dags/boundary_probe.py).

Task and parse-time code run as the DAG user (``fgov-dag``): the provider's executor starts each task as
a new process under it, and the dag-processor runs under it; the keys, the database passwords and Airflow's
signing key belong to the deployment's user and the control plane. The probe also asks the control plane
for lease, tuning, revoker and provenance logins: its run has no approval, so none is given.
"""

from __future__ import annotations

import json
import time

import pytest
from support import StackView

from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
DAG_ID = "boundary_probe"
NOTHING = {"dataset_rows": [], "governance_write": [], "openbao_token": [], "openbao_trusted_key": [],
           "airflow_token": [], "auth_tables": []}


def report(view: StackView, where: str, timeout: float = 180) -> dict:
    path = view.stack.dir / "dags" / f"boundary_probe.{where}.json"
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"the {where} probe wrote no report"
        time.sleep(1)
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def probed(stack: Stack) -> dict[str, dict]:
    view = StackView(stack)
    state = stack.load() or {}
    (stack.dir / "dags" / "boundary_probe.targets.json").write_text(json.dumps({
        "postgres": {"port": state["postgres"]["port"]}, "openbao": {"addr": state["openbao"]["addr"]},
        "airflow": {"url": state["airflow"]["url"]}, "control_plane": {"socket": state["control_plane"]["socket"]}}))
    (stack.dir / "dags" / "boundary_probe.parse").write_text("probe at the next parse")
    _, state, tasks = view.run(DAG_ID)
    assert state == "success", tasks
    found = {"task": report(view, "task"), "parse": report(view, "parse")}
    print(json.dumps(found, indent=2))  # which sources worked, never a secret (the probe writes none)
    for where, seen in found.items():  # it did search (outside the xfail: a probe that finds nothing to try errs)
        assert seen["candidates"] > 0 and seen["uid"] >= 0, (where, seen)
    return found


def test_task_code_finds_nothing_usable(probed: dict[str, dict]) -> None:
    assert probed["task"]["uid"] != 0 and probed["task"]["usable"] == NOTHING


def test_parse_time_code_finds_nothing_usable(probed: dict[str, dict]) -> None:
    assert probed["parse"]["uid"] != 0 and probed["parse"]["usable"] == NOTHING


@pytest.mark.parametrize("where", ["task", "parse"])
def test_dag_code_reaches_airflows_database_but_not_who_approves(probed: dict[str, dict], where: str) -> None:
    """DAG code logs in to Airflow's metadata database (the DAG user's login, in its airflow.cfg, as Airflow's
    DAG-side components need), and cannot read a password hash, rewrite a user, give itself a role (an approver's)
    or read a web session there: the FAB auth manager's tables are withheld from that login."""
    assert any(login.startswith("airflow_dag from airflow.cfg") for login in probed[where]["metadata_logins"]), \
        probed[where]["metadata_logins"]
    assert probed[where]["usable"]["auth_tables"] == []

"""The trust boundary, measured: a probe in a DAG the requester commits, at parse time and as a plain
PythonOperator task, searches everything it can read for credentials and tries them against PostgreSQL,
OpenBao and the Airflow API (tests/integration/dags/boundary_probe.py).

This is the acceptance test of the control plane (issue 16) and it fails today: with the embedded
stack's LocalExecutor, task and parse-time code run as the scheduler's OS user and read the stack's
secrets (see the README's *Trust boundary*). It is marked ``xfail(strict=True)``: it runs and performs the
attack on every test run, and the day the boundary holds it passes, which fails the suite until the
marker goes.
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
           "airflow_token": []}


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


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="issue 16: task code runs as the scheduler's OS user (LocalExecutor) and reads the stack's "
                          "secrets")
def test_task_code_finds_nothing_usable(probed: dict[str, dict]) -> None:
    assert probed["task"]["usable"] == NOTHING


@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="issue 16: the dag-processor runs DAG files as the stack's OS user and they read the "
                          "stack's secrets")
def test_parse_time_code_finds_nothing_usable(probed: dict[str, dict]) -> None:
    assert probed["parse"]["usable"] == NOTHING

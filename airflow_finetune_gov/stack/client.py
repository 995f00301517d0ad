"""A small REST client for Airflow's public API, acting as one real user (used by the demo and tests)."""

from __future__ import annotations

import time
from typing import Any

import requests

from airflow_finetune_gov.stack.procs import StackError

TERMINAL = {"success", "failed"}


class AirflowClient:
    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30) -> None:
        self.base = base_url.rstrip("/")
        self.username = username
        self.timeout = timeout
        resp = requests.post(f"{self.base}/auth/token", json={"username": username, "password": password},
                             timeout=timeout)
        if resp.status_code not in (200, 201):
            raise StackError(f"login as {username} failed: HTTP {resp.status_code} {resp.text[:200]}")
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {resp.json()['access_token']}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        return self.session.request(method, f"{self.base}/api/v2{path}", timeout=self.timeout, **kwargs)

    def _ok(self, resp: requests.Response, what: str) -> Any:
        if resp.status_code >= 300:
            raise StackError(f"{what} as {self.username}: HTTP {resp.status_code} {resp.text[:300]}")
        return resp.json() if resp.content else None

    def wait_for_dag(self, dag_id: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resp = self.request("GET", f"/dags/{dag_id}")
            if resp.status_code == 200:
                if resp.json().get("is_paused"):
                    self._ok(self.request("PATCH", f"/dags/{dag_id}", json={"is_paused": False}), "unpause")
                return
            time.sleep(1)
        raise StackError(f"DAG {dag_id} did not appear in Airflow within {timeout:.0f}s: check the "
                         "dag-processor log for import errors")

    def trigger(self, dag_id: str, conf: dict[str, Any]) -> str:
        data = self._ok(self.request("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf}),
                        f"trigger {dag_id}")
        return data["dag_run_id"]

    def run_state(self, dag_id: str, run_id: str) -> str:
        return self._ok(self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}"), "read run")["state"]

    def task_states(self, dag_id: str, run_id: str) -> dict[str, str | None]:
        data = self._ok(self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances"), "read tasks")
        return {ti["task_id"]: ti["state"] for ti in data["task_instances"]}

    def wait_task_state(self, dag_id: str, run_id: str, task_id: str, states: set[str],
                        timeout: float = 300) -> str:
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.task_states(dag_id, run_id).get(task_id)
            if state in states:
                return state
            if self.run_state(dag_id, run_id) in TERMINAL:
                raise StackError(f"run {run_id} ended before {task_id} reached {states} (it is {state}): "
                                 f"{self.task_states(dag_id, run_id)}")
            time.sleep(1)
        raise StackError(f"{task_id} did not reach {states} within {timeout:.0f}s (it is {state})")

    def hitl_detail(self, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> dict[str, Any]:
        return self._ok(self.request(
            "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails"),
            "read approval request")

    def answer(self, dag_id: str, run_id: str, task_id: str, option: str,
               map_index: int = -1, comment: str = "") -> requests.Response:
        return self.request(
            "PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails",
            json={"chosen_options": [option], "params_input": {"comment": comment}},
        )

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.run_state(dag_id, run_id)
            if state in TERMINAL:
                return state
            time.sleep(1)
        raise StackError(f"run {run_id} did not finish within {timeout:.0f}s")

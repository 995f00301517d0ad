"""Helpers shared by the tests that drive the embedded stack (importable as ``support``: pytest puts
``tests/`` on ``sys.path``, see ``pythonpath`` in pyproject.toml)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hvac
import psycopg
import pytest
import requests

from airflow_finetune_gov.demo import SETTLE_SECONDS
from airflow_finetune_gov.lineage.store import LineageStore
from airflow_finetune_gov.registry.provenance import MODEL_SIGNATURE
from airflow_finetune_gov.stack.client import AirflowClient
from airflow_finetune_gov.stack.manager import Stack


def model_signing_verify(folder: Path, public_key: str | Path) -> subprocess.CompletedProcess[str]:
    """The OpenSSF tool (``model_signing verify key``) on a model folder's ``model.sig``, with the public key
    only."""
    return subprocess.run([sys.executable, "-m", "model_signing", "verify", "key", "--signature",
                           str(Path(folder) / MODEL_SIGNATURE), "--public_key", str(public_key), str(folder)],
                          capture_output=True, text=True, check=False, timeout=120)


class StackView:
    """A running test stack seen from outside: Airflow users over REST, lineage, PostgreSQL."""

    def __init__(self, stack: Stack) -> None:
        state = stack.load()
        assert state is not None
        self.stack, self.state = stack, state

    def client(self, user: str) -> AirflowClient:
        return AirflowClient(self.state["airflow"]["url"], user, self.stack.airflow_password(user))

    def events(self, run_id: str, kind: str | None = None) -> list[Any]:
        return LineageStore(Path(self.state["governance_db_url_file"]).read_text()).events(run_id=run_id,
                                                                                          event_type=kind)

    def superuser(self, db: str = "postgres") -> psycopg.Connection:
        pw = Path(self.state["postgres"]["superuser_password_file"]).read_text()
        return psycopg.connect(host="127.0.0.1", port=self.state["postgres"]["port"], user="postgres",
                               password=pw, dbname=db, autocommit=True)

    def trigger(self, dag_id: str, *, as_user: str = "requester", **conf: str) -> str:
        """Trigger ``dag_id`` as ``as_user`` (waiting until the DAG is parsed and unpaused)."""
        requester = self.client(as_user)
        requester.wait_for_dag(dag_id)
        return requester.trigger(dag_id, conf)

    def run(self, dag_id: str, **conf: str) -> tuple[str, str, dict]:
        """Trigger ``dag_id`` and wait for the run to end: (run_id, state, task states)."""
        run_id = self.trigger(dag_id, **conf)
        state = self.client("requester").wait_run(dag_id, run_id, timeout=300)
        return run_id, state, self.client("requester").task_states(dag_id, run_id)

    def task_log(self, dag_id: str, run_id: str, task_id: str) -> str:
        logs = list(self.stack.dir.rglob(f"dag_id={dag_id}/run_id={run_id}/task_id={task_id}/*.log"))
        assert logs, f"no log for {task_id}"
        return "\n".join(p.read_text(errors="replace") for p in logs)

    def role_and_sessions(self, role: str) -> tuple[int, int]:
        """How many PostgreSQL roles named ``role`` exist, and how many sessions it has open."""
        with self.superuser() as conn:
            roles = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            sessions = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE usename = %s", (role,)).fetchone()
        assert roles is not None and sessions is not None
        return int(roles[0]), int(sessions[0])

    def approved_run(self, dag_id: str, marker: Path, mode: str) -> str:
        """Trigger a run of a fault DAG (``mode``, ``marker``) and approve it as ``approver1``."""
        run_id = self.trigger(dag_id, mode=mode, marker=str(marker))
        self.client("requester").wait_task_state(dag_id, run_id, "approval_gate", {"awaiting_input"}, timeout=120)
        time.sleep(SETTLE_SECONDS)
        self.answer(dag_id, run_id, "approver1", "Approve")
        return run_id

    def training_lease(self, run_id: str) -> dict[str, Any]:
        """The training lease (the policy check's catalog lease is issued and revoked before it)."""
        return next(e.payload_dict() for e in self.events(run_id)
                    if e.event_type == "lease.issued" and e.task_id == "acquire_lease")

    def role_count(self, role: str) -> int:
        with self.superuser() as conn:
            row = conn.execute("SELECT count(*) FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        assert row is not None
        return int(row[0])

    def bao(self) -> hvac.Client:
        """OpenBao as root (test setup only: the product never holds a static token)."""
        return hvac.Client(url=self.state["openbao"]["addr"],
                           token=Path(self.state["openbao"]["root_token_file"]).read_text())

    def wait_round(self, dag_id: str, run_id: str, n: int, timeout: float = 120,
                   task_id: str = "approval_gate", as_user: str = "requester") -> None:
        """Wait until request round ``n`` is open (recorded, and the task awaits input, as ``as_user`` reads it,
        who must reach the DAG), then settle."""
        deadline = time.monotonic() + timeout
        while len(self.events(run_id, "approval.requested")) < n:
            assert time.monotonic() < deadline, f"round {n} of the approval request never opened"
            time.sleep(0.5)
        self.client(as_user).wait_task_state(dag_id, run_id, task_id, {"awaiting_input"}, timeout=120)
        time.sleep(SETTLE_SECONDS)

    def set_roles(self, user: str, roles: list[str]) -> list[str]:
        """Give ``user`` exactly ``roles``, as ops would (``admin``, through the FAB auth manager's API); returns
        the roles they had, to put back."""
        url, admin = f"{self.state['airflow']['url']}/auth/fab/v1/users/{user}", self.stack.token("admin")
        headers = {"Authorization": f"Bearer {admin}"}
        before = requests.get(url, headers=headers, timeout=30)
        assert before.status_code == 200, before.text
        resp = requests.patch(url, params={"update_mask": "roles"}, json={"roles": [{"name": r} for r in roles]},
                              headers=headers, timeout=30)
        assert resp.status_code == 200, resp.text
        return [r["name"] for r in before.json()["roles"]]

    def answer(self, dag_id: str, run_id: str, user: str, option: str, comment: str = "",
               task_id: str = "approval_gate", status: int = 200) -> None:
        resp = self.client(user).request(
            "PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/-1/hitlDetails",
            json={"chosen_options": [option], "params_input": {"comment": comment}})
        assert resp.status_code == status, resp.text


def wait_for_pid(marker: Path, timeout: float = 300) -> int:
    """The pid a fault DAG's tuning backend writes to ``marker`` once the tuning task runs."""
    deadline = time.monotonic() + timeout
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline, f"the tuning task never started (no {marker})"
        time.sleep(0.2)
    return int(marker.read_text())


@contextmanager
def signed_in_page(stack: Stack, user: str, next_path: str = "/") -> Iterator[Any]:
    """A headless Chromium page (Debian's package, driven by Playwright) signed in to the stack's
    Airflow as ``user``, at ``next_path``."""
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: ./scripts/ensure-chromium installs it")
    from playwright.sync_api import sync_playwright

    state = stack.load()
    assert state is not None
    url = state["airflow"]["url"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{url}/auth/login?next={next_path}")
            page.get_by_label("Username").fill(user)
            page.get_by_label("Password").fill(stack.airflow_password(user))
            page.get_by_role("button", name="Sign in").click()
            # Signed in means the UI's token cookie is set: waiting for the URL alone is not enough,
            # since "**/**" also matches the login page itself (a loaded machine lost that race in CI).
            deadline = time.monotonic() + 60
            while not any(c["name"] == "_token" for c in page.context.cookies()):
                if time.monotonic() > deadline:
                    raise AssertionError(f"{user} was not signed in: {page.url}\n{page.inner_text('body')[:500]}")
                page.wait_for_timeout(200)
            page.wait_for_url(lambda u: "/auth/login" not in u, timeout=60_000)
            yield page
        finally:
            browser.close()


def issued_secrets(raw_audit_log: Path) -> dict[str, list[str]]:
    """Every password, wrapping token and client token OpenBao issued, from the test-only raw audit
    device (the stack's real audit log stores them HMAC-ed)."""
    found: dict[str, list[str]] = {"password": [], "wrap token": [], "client token": []}
    for line in raw_audit_log.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") != "response":
            continue
        response = entry.get("response") or {}
        if entry["request"]["path"].startswith("fgov-database/creds/") and (response.get("data") or {}).get(
                "password"):
            found["password"].append(response["data"]["password"])
        if entry["request"]["path"] == "sys/wrapping/wrap" and response.get("wrap_info"):
            found["wrap token"].append(response["wrap_info"]["token"])
        if (response.get("auth") or {}).get("client_token"):
            found["client token"].append(response["auth"]["client_token"])
    return found


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def with_claims(token: str, **changes: object) -> str:
    """The same JWT with some payload claims changed and the original signature kept."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return ".".join([header, b64(json.dumps({**claims, **changes}).encode()), signature])

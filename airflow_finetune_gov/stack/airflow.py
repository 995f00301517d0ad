"""Airflow 3.3 components (api-server, scheduler, dag-processor, triggerer) for the embedded stack.

Components run separately rather than under ``airflow standalone`` so each has its own recorded pid
and log, and a test can restart one of them (the scheduler, say) without touching the others.
Users come from the simple auth manager with real roles; all-admins mode is never enabled because
HITL then records every responder as ``Anonymous`` and separation of duties is lost.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import requests

from airflow_finetune_gov.stack.procs import ProcRecord, StackError, spawn, wait_for

# user -> simple-auth-manager role. Approvers are plain `user`s: the gate, not the role, makes them
# approvers. The auditor can read everything and change nothing.
USERS: dict[str, str] = {
    "requester": "user",
    "approver1": "user",
    "approver2": "user",
    "auditor": "viewer",
}

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")


def airflow_bin() -> Path:
    candidate = Path(sys.executable).parent / "airflow"
    if candidate.exists():
        return candidate
    found = shutil.which("airflow")
    if not found:
        raise StackError("the `airflow` command is not on PATH: install apache-airflow>=3.3 in this environment")
    return Path(found)


def write_config(home: Path, values: Mapping[str, Mapping[str, str]]) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    parser = configparser.ConfigParser(interpolation=None)
    for section, options in values.items():
        parser[section] = dict(options)
    path = home / "airflow.cfg"
    with open(path, "w") as fh:
        parser.write(fh)
    path.chmod(0o600)
    return path


def env_for(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env["AIRFLOW_HOME"] = str(home)
    env["PATH"] = f"{airflow_bin().parent}{os.pathsep}{env.get('PATH', '')}"
    # Keep task subprocesses from picking up a user's own Vault settings.
    for key in ("VAULT_TOKEN", "VAULT_ADDR", "BAO_TOKEN", "BAO_ADDR"):
        env.pop(key, None)
    return env


def cli(home: Path, *args: str, timeout: float = 600) -> str:
    result = subprocess.run([str(airflow_bin()), *args], env=env_for(home), capture_output=True, text=True,
                            timeout=timeout, check=False)
    if result.returncode != 0:
        raise StackError(f"`airflow {' '.join(args[:2])}` failed:\n{result.stderr[-4000:]}")
    return result.stdout


def migrate(home: Path) -> None:
    cli(home, "db", "migrate")


def add_vault_connection(home: Path, vault_port: int, jwt_mount: str) -> None:
    extra = json.dumps({"auth_type": "jwt", "auth_mount_point": jwt_mount, "use_tls": False})
    subprocess.run([str(airflow_bin()), "connections", "delete", "vault_default"], env=env_for(home),
                   capture_output=True, check=False)
    cli(home, "connections", "add", "vault_default", "--conn-type", "vault", "--conn-host", "127.0.0.1",
        "--conn-port", str(vault_port), "--conn-extra", extra)


def start_component(home: Path, name: str, logs: Path) -> ProcRecord:
    return spawn(f"airflow-{name}", [str(airflow_bin()), name], log=logs / f"airflow-{name}.log",
                 env=env_for(home), cwd=home)


def health(base_url: str) -> dict:
    try:
        resp = requests.get(f"{base_url}/api/v2/monitor/health", timeout=2)
        if resp.status_code != 200:
            return {}
        return resp.json()
    except (requests.RequestException, ValueError):
        return {}


def components_healthy(base_url: str) -> bool:
    data = health(base_url)
    if not data:
        return False
    wanted = ("metadatabase", "scheduler", "dag_processor", "triggerer")
    return all(data.get(name, {}).get("status") == "healthy" for name in wanted)


def wait_healthy(base_url: str, records: list[ProcRecord], timeout: float = 180) -> None:
    def ok() -> bool:
        for record in records:
            if not record.alive():
                raise StackError(f"{record.name} exited during start-up; see {record.log}")
        return components_healthy(base_url)

    wait_for(ok, timeout=timeout, what=f"Airflow at {base_url}")

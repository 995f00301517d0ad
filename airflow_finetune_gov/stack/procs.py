"""Start and stop the stack's processes, always by recorded pid (never by name).

Each process is started as the leader of a new session, so its pid is also its process-group id and
stopping the group takes its children (uvicorn workers, executor subprocesses) with it. The recorded
start time guards against a recycled pid: a process whose start time differs is not ours.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil


class StackError(RuntimeError):
    """A stack operation failed; the message names the problem and the fix."""


@dataclass
class ProcRecord:
    name: str
    pid: int
    create_time: float
    log: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ProcRecord:
        return cls(name=data["name"], pid=int(data["pid"]), create_time=float(data["create_time"]),
                   log=data["log"])

    def process(self) -> psutil.Process | None:
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 1.0:
                return None
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.NoSuchProcess:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def spawn(name: str, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, user: str | None = None, groups: Sequence[int] = ()) -> ProcRecord:
    log.parent.mkdir(parents=True, exist_ok=True)
    # 0640: a component's log is the deployment's, not the DAG user's to read
    with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640), "ab") as out:
        try:
            proc = subprocess.Popen(
                list(argv), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                **_drop_to(user, groups),
            )
        except FileNotFoundError as exc:
            raise StackError(f"{name}: executable not found: {argv[0]} ({exc})") from exc
    return ProcRecord(name=name, pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(),
                      log=str(log))


def _drop_to(user: str | None, groups: Sequence[int] = ()) -> dict[str, Any]:
    """Popen arguments that run as ``user`` with its own group, ``groups`` and none of root's supplementary
    groups (with root's kept, a group-only directory such as ``/root`` would stay closed to it, and others
    open)."""
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": list(groups)}


def stop(record: ProcRecord, *, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Stop a recorded process and its process group; escalate to SIGKILL after ``timeout``."""
    proc = record.process()
    if proc is None:
        _kill_group_leftovers(record.pid)
        return
    members = _group_members(record.pid)
    # Descendants that left the process group (Airflow runs each task in its own session) are stopped
    # too: by the psutil handles taken now, which refuse to signal a recycled pid.
    try:
        descendants = proc.children(recursive=True)
    except psutil.Error:
        descendants = []
    in_group = {m.pid for m in members}
    outside = [d for d in descendants if d.pid not in in_group]
    try:
        os.killpg(record.pid, sig)
    except ProcessLookupError:
        return
    except PermissionError:
        proc.send_signal(sig)
    for d in outside:
        with contextlib.suppress(psutil.Error):
            d.send_signal(sig)
    _gone, alive = psutil.wait_procs([proc, *members, *outside], timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    _kill_group_leftovers(record.pid)


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(p.pid) == pgid and p.pid != pgid:
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return members


def _kill_group_leftovers(pgid: int) -> None:
    leftovers = _group_members(pgid)
    for p in leftovers:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(leftovers, timeout=5)


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def pick_free_port(exclude: set[int], host: str = "127.0.0.1") -> int:
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in exclude:
            exclude.add(port)
            return port
    raise StackError("could not find a free TCP port on 127.0.0.1")


def wait_for(predicate, *, timeout: float, what: str, record: ProcRecord | None = None,
             interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if record is not None and not record.alive():
            raise StackError(f"{what}: the process exited during start-up; see its log {record.log}:\n"
                             f"{tail(Path(record.log))}")
        time.sleep(interval)
    raise StackError(f"{what}: not ready after {timeout:.0f}s"
                     + (f"; see its log {record.log}:\n{tail(Path(record.log))}" if record else ""))


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def tcp_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False

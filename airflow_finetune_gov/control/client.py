"""The governed operators' side of the control plane: calls over its unix socket.

A task never says who it is: the control plane knows from the kernel which process is calling. Errors
come back as the exception the control plane raised (``AirflowFailException`` stays a failure without
retry, a lease or lineage error stays one), with the control plane's log lines for the call written to
the task's log first.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import threading
from collections.abc import Mapping
from typing import Any

from airflow_finetune_gov.lineage.store import EventKey, LineageError, LineageEvent

TIMEOUT_SECONDS = 300.0  # a revocation proves each role gone on PostgreSQL: allow it time
EXECUTE_TIMEOUT = 6 * 3600.0
FRAME = struct.Struct(">I")  # each request and answer: its length in 4 bytes (big-endian), then JSON


class ControlPlaneError(RuntimeError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ControlPlaneError("unreachable", f"the control plane at {path} does not answer "
                                               f"({exc.strerror or exc}): is `fgov control-plane serve` "
                                               "running (the embedded stack starts it)?") from None
    return sock


def _exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(FRAME.pack(len(data)) + data)
    (size,) = FRAME.unpack(read_exactly(sock, FRAME.size))
    return read_exactly(sock, size)


def read_exactly(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise ConnectionError("the control plane closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class ControlPlaneClient:
    def __init__(self, socket_path: str, *, delegation: str | None = None, log: Any = None,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self.socket_path = socket_path
        self.delegation = delegation
        self.log = log or logging.getLogger("airflow_finetune_gov.control.client")
        self.timeout = timeout
        self._local = threading.local()  # one kept-alive connection per thread

    def _send(self, path: str, data: bytes) -> bytes:
        """One request and its answer on this thread's connection, kept alive between calls; a connection the
        control plane closed meanwhile (a restart) is opened again once.

        A call made while this thread's connection is in the middle of another (a signal handler such as a
        task's ``on_kill`` interrupting it) goes on a connection of its own: sharing one would hand each call
        the other's answer. A call interrupted by an exception leaves its connection closed, never reused."""
        import os

        if getattr(self._local, "busy", False):
            own = _connect(self.socket_path, self.timeout)
            try:
                return _exchange(own, data)
            except OSError as exc:
                raise ControlPlaneError("unreachable", f"the control plane at {self.socket_path} failed during "
                                                       f"{path}: {type(exc).__name__}: {exc}") from None
            finally:
                own.close()
        for attempt in (1, 2):
            sock: socket.socket | None = getattr(self._local, "sock", None)
            if sock is not None and getattr(self._local, "pid", None) != os.getpid():
                sock = None  # inherited through a fork: the parent may be using it; the kernel names us anew
            fresh = sock is None
            if sock is None:
                sock = self._local.sock = _connect(self.socket_path, self.timeout)
                self._local.pid = os.getpid()
            self._local.busy = True
            try:
                return _exchange(sock, data)
            except OSError as exc:
                sock.close()
                self._local.sock = None
                if fresh or attempt == 2:
                    raise ControlPlaneError("unreachable", f"the control plane at {self.socket_path} failed during "
                                                           f"{path}: {type(exc).__name__}: {exc}") from None
            except BaseException:
                sock.close()  # interrupted half-way: what is left to read on it belongs to no later call
                self._local.sock = None
                raise
            finally:
                self._local.busy = False
        raise AssertionError("unreachable")

    def call(self, path: str, body: Mapping[str, Any] | None = None, *, log: Any = None) -> Any:
        request: dict[str, Any] = {"call": path, "body": dict(body or {})}
        if self.delegation:
            request["delegation"] = self.delegation
        raw = self._send(path, json.dumps(request, default=str).encode())
        try:
            answer = json.loads(raw)
        except ValueError:
            raise ControlPlaneError("bad", f"the control plane answered {path} with no JSON") from None
        status = answer.get("status")
        out = log or self.log
        for level, line in answer.get("log") or []:
            getattr(out, level if level in ("info", "warning", "error") else "info")("control plane: %s", line)
        if answer.get("ok"):
            return answer.get("result")
        error = answer.get("error") or {}
        raise _as_exception(str(error.get("kind") or "bad"), str(error.get("message") or f"status {status}"))

    # --- the calls ---------------------------------------------------------------------------------
    def whoami(self) -> dict[str, Any]:
        return self.call("/v1/whoami")

    def delegate(self, seconds: float | None = None) -> str:
        return str(self.call("/v1/tasks/delegate", {"seconds": seconds})["delegation"])

    def login(self, role: str, purpose: str, extra: Mapping[str, str] | None = None) -> str:
        return str(self.call("/v1/openbao/login", {"role": role, "purpose": purpose, "extra": dict(extra or {})})
                   ["token"])

    def revoke(self, *, reason: str, purposes: tuple[str, ...], lease_ids: set[str] | None,
               fallback: list[dict[str, Any]] | None, log: Any = None) -> list[dict[str, Any]]:
        return list(self.call("/v1/leases/revoke", {
            "reason": reason, "purposes": list(purposes),
            "lease_ids": sorted(lease_ids) if lease_ids is not None else None, "fallback": fallback}, log=log))

    def sweep(self, *, dry_run: bool = False, log: Any = None) -> list[dict[str, Any]]:
        return list(self.call("/v1/leases/sweep", {"dry_run": dry_run}, log=log))

    def execute(self, operator: str, params: Mapping[str, Any], *, log: Any = None) -> Any:
        """Run a governed operator's ``execute`` in the control plane (an evaluation takes minutes: the task's
        own ``execution_timeout`` bounds the wait)."""
        slow = ControlPlaneClient(self.socket_path, delegation=self.delegation, log=self.log, timeout=EXECUTE_TIMEOUT)
        return slow.call("/v1/operators/execute", {"operator": operator, "params": dict(params)}, log=log)

    def register(self, pid: int, ti: Mapping[str, Any]) -> None:
        self.call("/v1/tasks/register", {"pid": pid, **ti})

    def deregister(self, pid: int) -> None:
        self.call("/v1/tasks/deregister", {"pid": pid})


def _as_exception(kind: str, message: str) -> Exception:
    if kind == "AirflowFailException":
        from airflow.sdk.exceptions import AirflowFailException

        return AirflowFailException(message)
    if kind in ("AirflowException", "AirflowRuntimeError"):
        from airflow.sdk.exceptions import AirflowException

        return AirflowException(message)
    if kind in ("RunNotWitnessed", "ControlError"):
        from airflow.sdk.exceptions import AirflowFailException

        return AirflowFailException(message)
    if kind == "LineageError":
        return LineageError(message)
    if kind == "LeaseError":
        from airflow_finetune_gov.credentials.broker import LeaseError

        return LeaseError(message)
    return ControlPlaneError(kind, message)


class RemoteLineageStore:
    """The part of :class:`~airflow_finetune_gov.lineage.store.LineageStore` a task uses, through the
    control plane: it appends under the calling task's own key and reads the calling task's own run."""

    def __init__(self, client: ControlPlaneClient) -> None:
        self.client = client

    def record(self, key: EventKey, event_type: str, *, actor: str, payload: Mapping[str, Any]) -> LineageEvent:
        try:
            row = self.client.call("/v1/lineage/append", {"key": _key(key), "event_type": event_type,
                                                          "actor": actor, "payload": dict(payload)})
        except ControlPlaneError as exc:
            raise LineageError(f"could not write lineage event {event_type}: {exc}") from None
        return _event(row)

    def events(self, *, dag_id: str | None = None, run_id: str | None = None, event_type: str | None = None,
               event_prefix: str | None = None) -> list[LineageEvent]:
        try:
            rows = self.client.call("/v1/lineage/events", {"dag_id": dag_id, "run_id": run_id,
                                                           "event_type": event_type, "event_prefix": event_prefix})
        except ControlPlaneError as exc:
            raise LineageError(f"could not read lineage events of {dag_id}/{run_id}: {exc}") from None
        return [_event(row) for row in rows]


def _key(key: EventKey) -> list[Any]:
    return [key.dag_id, key.run_id, key.task_id, int(key.try_number), int(key.map_index)]


def _event(row: Mapping[str, Any]) -> LineageEvent:
    from airflow_finetune_gov.lineage.store import canonical

    fields = {c.key for c in LineageEvent.__table__.columns}
    values = {k: v for k, v in row.items() if k in fields}
    values["payload"] = canonical(dict(row.get("payload") or {}))  # as stored: the hash covers this text
    return LineageEvent(**values)

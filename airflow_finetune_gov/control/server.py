"""``fgov control-plane serve``: the control plane's unix-socket service.

Who may call what:

- **The executor** (a process of the deployment's own user, uid 0 or the control plane's own uid, checked
  with ``SO_PEERCRED``) registers each task process it starts (``/v1/tasks/register``, with the task
  instance it runs) and deregisters it when it exits.
- **A task** is whichever registered process is the calling process or one of its ancestors. Nothing the
  caller sends names it: a task can act as itself only, and only while its process runs. A trigger (in the
  triggerer, which no executor registers) acts for the deferred task with a delegation the task asked for
  before it deferred (``/v1/tasks/delegate``: random, kept only as its hash, bound to that task, expiring).
- What a task may do as itself: append lineage events under its own key (``/v1/lineage/append``; the
  event types are checked against their definitions), read its own run's events, log in to OpenBao for a
  role its run entitles it to (``/v1/openbao/login``: a dataset's lease and tuning roles only under a
  recorded approval for that dataset, the service roles always, the revoker never), and have the control
  plane revoke its run's leases or sweep finished runs' (``/v1/leases/revoke``, ``/v1/leases/sweep``).
- What only the control plane does: decide (``/v1/operators/execute`` runs the policy and rollback checks,
  the evaluation, the promotion and the rollback here, on the arguments the task sends, with the requester
  the api-server witnessed), and record what is reserved to the deployment's components (the event types
  with ``reserved=True`` in :mod:`airflow_finetune_gov.lineage.events`; the scheduler's ``run.started`` and
  the api-server's ``run.requested`` and ``approval.witnessed`` are written by those components
  themselves): a task appending one is refused.

The wire: on one connection, requests and answers in turn, each a JSON object preceded by its length in 4
bytes (``client.FRAME``; no HTTP: its parsing and a per-request ``/proc`` lookup cost the 20-writer bench
two thirds of its throughput). A request is ``{"call": "/v1/...", "body": {...}, "delegation": ...}``; the
answer is ``{"ok": true, "status": 200, "result": ..., "log": [...]}`` or ``{"ok": false, "status": 403 |
409 | 400 | 500, "error": {"kind": ..., "message": ...}, "log": [...]}``; ``log`` carries what the control
plane logged for the call, so the task's own log shows it. The caller is named once per connection (the
kernel's peer is fixed when it connects) and trusted while that task's registration stands. No answer, log
line or lineage event carries a secret other than the OpenBao token a login returns to the task that asked
for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from airflow_finetune_gov.control.client import FRAME, read_exactly
from airflow_finetune_gov.credentials.identity import TaskIdentity

log = logging.getLogger("airflow_finetune_gov.control")
REGISTRATION_WAIT_SECONDS = 3.0  # a task process may call before its executor's registration is in
DEFAULT_DELEGATION_SECONDS = 24 * 3600
MAX_BODY = 4 * 1024 * 1024


class ControlError(Exception):
    """A refused call: ``kind`` is ``denied`` (who you are), ``refused`` (what you asked) or ``bad``."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Registered:
    pid: int
    ti_id: str
    identity: TaskIdentity
    registered_at: float
    started: int | None  # the process's start time (clock ticks since boot): a reused pid is not the task


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end of a unix socket, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def _parent(pid: int) -> int:
    """The parent of ``pid`` (0 when it is gone); read from ``/proc``, which the caller cannot write."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # pid (comm) state ppid ...; comm may hold spaces and parentheses: split after the last ')'
    return int(stat.rsplit(")", 1)[1].split()[1])


def _started(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``None`` when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _age(pid: int) -> float:
    """Seconds since ``pid`` started (infinite when it is gone)."""
    start_ticks = _started(pid)
    try:
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("inf")
    return float("inf") if start_ticks is None else uptime - start_ticks / os.sysconf("SC_CLK_TCK")


class Registry:
    """Task processes the executor started, and delegations for their triggers (memory only: a restart of
    the control plane forgets them, and the running tasks and deferred triggers then fail their next call)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_pid: dict[int, Registered] = {}
        self._delegations: dict[str, tuple[TaskIdentity, float]] = {}

    def register(self, pid: int, ti_id: str, identity: TaskIdentity) -> None:
        with self._lock:
            self._by_pid[pid] = Registered(pid, ti_id, identity, time.time(), _started(pid))

    def deregister(self, pid: int) -> bool:
        with self._lock:
            return self._by_pid.pop(pid, None) is not None

    def current(self, found: Registered) -> bool:
        """Whether ``found`` is still registered (its task process has not ended)."""
        with self._lock:
            return self._by_pid.get(found.pid) is found

    def registered(self) -> list[Registered]:
        with self._lock:
            return list(self._by_pid.values())

    def task_of(self, pid: int) -> Registered | None:
        """The registered task whose process is ``pid`` or one of its ancestors."""
        seen = 0
        while pid > 1 and seen < 64:
            with self._lock:
                found = self._by_pid.get(pid)
            if found is not None:
                if found.started is not None and _started(pid) != found.started:
                    self.deregister(pid)  # the task's process is gone and its pid now names another process
                    return None
                return found
            pid, seen = _parent(pid), seen + 1
        return None

    def delegate(self, identity: TaskIdentity, seconds: float) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            now = time.time()
            self._delegations = {k: v for k, v in self._delegations.items() if v[1] > now}
            self._delegations[_digest(token)] = (identity, now + seconds)
        return token

    def delegated(self, token: str) -> TaskIdentity | None:
        with self._lock:
            found = self._delegations.get(_digest(token))
        if found is None or found[1] <= time.time():
            return None
        return found[0]


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class GroupCommit:
    """The control plane's one lineage appender: callers hand it their event and wait; it writes whatever has
    queued up meanwhile in one transaction (``LineageStore.record_many``), so N concurrent writers pay one
    commit, not N (the chain's lock is held per commit). A lone writer waits for no one."""

    def __init__(self, store: Any, max_batch: int = 256) -> None:
        import queue

        self.store, self.max_batch = store, max_batch
        self._queue: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fgov-lineage-appender", daemon=True)
        self._thread.start()

    def record(self, key: Any, event_type: str, *, actor: str, payload: dict[str, Any]) -> Any:
        from concurrent.futures import Future

        done: Future[Any] = Future()
        self._queue.put(((key, event_type, actor, payload), done))
        return done.result()

    def _run(self) -> None:
        import queue

        while True:
            batch = [self._queue.get()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                written = self.store.record_many([item for item, _ in batch])
            except BaseException as exc:  # each waiting caller gets the error, for its event; the appender goes on
                from airflow_finetune_gov.lineage.store import LineageError

                for (key, event_type, _, _), done in batch:
                    done.set_exception(LineageError(f"could not write lineage event {event_type} for "
                                                    f"{key.dag_id}/{key.run_id}: {exc}"))
                continue
            for (_, done), event in zip(batch, written, strict=True):
                done.set_result(event)


class CapturingLog:
    """A task-like logger: lines go to the control plane's log and back to the calling task."""

    def __init__(self, who: str) -> None:
        self.who = who
        self.lines: list[tuple[str, str]] = []

    def _emit(self, level: str, msg: str, *args: Any, **_: Any) -> None:
        text = msg % args if args else str(msg)
        self.lines.append((level, text))
        log.log(logging.getLevelName(level.upper()), "%s: %s", self.who, text)

    def debug(self, msg: str, *args: Any, **kw: Any) -> None:
        pass

    def info(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("info", msg, *args)

    def warning(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("warning", msg, *args)

    def error(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("error", msg, *args)

    def exception(self, msg: str, *args: Any, **kw: Any) -> None:
        self._emit("error", msg, *args)


def service_context(identity: TaskIdentity, log_: CapturingLog, run_started: dict[str, Any] | None = None,
                    task: Any = None) -> dict[str, Any]:
    """What the provider's task-side functions read from an Airflow context, for one verified task: its
    identity, and its run's start and requester as the scheduler witnessed them (``run_started``, the
    newest ``run.started``); no XCom, no run conf: the control plane does not take the task's word."""
    ti = SimpleNamespace(dag_id=identity.dag_id, run_id=identity.run_id, task_id=identity.task_id,
                         try_number=identity.try_number, map_index=identity.map_index,
                         xcom_pull=lambda **_: [])
    started = run_started or {}
    return {"ti": ti, "task_instance": ti, "task": task or SimpleNamespace(log=log_, upstream_task_ids=set()),
            "dag_run": SimpleNamespace(start_date=started.get("start_date"),
                                       triggering_user_name=started.get("triggering_user_name"), conf={})}


# Operators whose whole ``execute`` runs in the control plane: what they record is reserved to it
# (``policy.decided``). The task sends the operator's rendered arguments: the request, not the decision.
PLANE_OPERATORS = {
    "policy_check": ("airflow_finetune_gov.policy.operators", "PolicyCheckOperator",
                     ("model", "dataset", "target_environment", "tuning_method", "base_version", "hyperparameters",
                      "dataset_digest", "justification")),
    "rollback_check": ("airflow_finetune_gov.registry.operators", "RollbackCheckOperator",
                       ("model", "alias", "to_version")),
    # Evaluation, promotion and rollback: the verdict, the store's aliases and the provenance signature are
    # the control plane's (the DAG author controls the trainer, never the verdict)
    "evaluation": ("airflow_finetune_gov.evaluation.operators", "BehaviourEvaluationOperator",
                   ("suites", "suite_files", "batch_size", "max_new_tokens", "detector", "subject",
                    "response_timeout")),
    "promote": ("airflow_finetune_gov.registry.operators", "PromoteModelOperator", ("alias",)),
    "rollback": ("airflow_finetune_gov.registry.operators", "RollbackModelOperator", ()),
}
# Operators of which one step runs here, as ``method(context, **arguments)``: the approval gate's request is
# rendered from the decision and recorded here (``approval.requested``), and the task opens exactly that
# request in Airflow (only a task can wait for a human). Arguments the constructor does not take go to the step.
PLANE_STEPS: dict[str, tuple[str, str, tuple[str, ...], str, tuple[str, ...]]] = {
    "approval_gate": ("airflow_finetune_gov.approval.operators", "FineTuneApprovalOperator",
                      ("response_timeout", "owners", "reopen"), "open_request", ("owners", "reopen")),
    # who approves the calling task's run now (the policy's teams and the auth manager's roles, which no task reads)
    "approvers_now": ("airflow_finetune_gov.approval.operators", "FineTuneApprovalOperator", (), "approvers_now", ()),
}


def _approvers_now(dag_id: str) -> list[str]:
    """``dag_id``'s approvers as the policy file (re-read when it changes) and the auth manager's roles say now:
    an approval counts only while its approver is one."""
    from airflow_finetune_gov.approval import people

    return people.approvers_now(dag_id)


class ControlPlane:
    """The calls, as plain methods (the socket layer below only authenticates and routes)."""

    def __init__(self, *, task_uid: int, admin_uids: set[int] | None = None,
                 delegation_seconds: float = DEFAULT_DELEGATION_SECONDS) -> None:
        self.task_uid = task_uid
        self.admin_uids = admin_uids if admin_uids is not None else {0, os.getuid()}
        self.delegation_seconds = delegation_seconds
        self.registry = Registry()
        self._appender: GroupCommit | None = None
        self._appender_lock = threading.Lock()

    def appender(self) -> GroupCommit:
        from airflow_finetune_gov import common

        with self._appender_lock:
            if self._appender is None:
                self._appender = GroupCommit(common.lineage_store())
            return self._appender

    # --- who is calling ---------------------------------------------------------------------------
    def admin(self, uid: int) -> None:
        if uid not in self.admin_uids:
            raise ControlError("denied", f"uid {uid} may not register task processes: only the executor "
                                         "(the deployment's own user) does")

    def task(self, pid: int, uid: int, delegation: str | None,
             known: dict[str, Registered] | None = None) -> TaskIdentity:
        """The task calling from process ``pid`` (or acting with ``delegation``). ``known``: what an earlier
        request on the same connection found (the kernel's peer is fixed per connection), trusted while that
        registration stands."""
        if delegation:
            identity = self.registry.delegated(delegation)
            if identity is None:
                raise ControlError("denied", "the delegation is unknown or expired (the control plane was "
                                             "restarted, or the trigger outlived it): the task must run again")
            return identity
        if known is not None and (cached := known.get("task")) is not None and self.registry.current(cached):
            return cached.identity
        deadline = time.monotonic() + REGISTRATION_WAIT_SECONDS
        while True:
            found = self.registry.task_of(pid)
            if found is not None:
                if known is not None:
                    known["task"] = found
                return found.identity
            # Only a process started moments ago may be racing its executor's registration: anything older
            # (a dag-processor, a triggerer, a shell) is refused at once
            if time.monotonic() >= deadline or _age(pid) > REGISTRATION_WAIT_SECONDS:
                raise ControlError("denied", f"process {pid} (uid {uid}) is no task the executor started: governed "
                                             "operators run only in task processes of the provider's executor "
                                             "(airflow_finetune_gov.executors.TaskUserLocalExecutor)")
            time.sleep(0.05)

    # --- calls ----------------------------------------------------------------------------------
    def register(self, uid: int, body: dict[str, Any]) -> dict[str, Any]:
        self.admin(uid)
        try:
            identity = TaskIdentity(dag_id=str(body["dag_id"]), run_id=str(body["run_id"]),
                                    task_id=str(body["task_id"]), try_number=int(body["try_number"]),
                                    map_index=int(body.get("map_index", -1)))
            pid = int(body["pid"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ControlError("bad", f"a registration needs pid, dag_id, run_id, task_id, try_number: {exc}") from None
        self.registry.register(pid, str(body.get("ti_id", "")), identity)
        log.info("task process %s registered: %s (map %s)", pid, identity.subject, identity.map_index)
        return {"registered": pid}

    def deregister(self, uid: int, body: dict[str, Any]) -> dict[str, Any]:
        self.admin(uid)
        return {"deregistered": self.registry.deregister(int(body["pid"]))}

    def delegate(self, identity: TaskIdentity, body: dict[str, Any]) -> dict[str, Any]:
        seconds = min(float(body.get("seconds") or self.delegation_seconds), self.delegation_seconds)
        return {"delegation": self.registry.delegate(identity, seconds), "expires_in": seconds}

    def append(self, identity: TaskIdentity, body: dict[str, Any]) -> dict[str, Any]:
        from airflow_finetune_gov.lineage import events
        from airflow_finetune_gov.lineage.store import EventKey

        key = EventKey(identity.dag_id, identity.run_id, identity.task_id, identity.try_number, identity.map_index)
        own = [key.dag_id, key.run_id, key.task_id, key.try_number, key.map_index]
        asked = body.get("key")
        if asked and list(asked) != own:
            raise ControlError("refused", f"a task appends lineage under its own key {own}, not {asked}")
        definition = events.EVENT_TYPES.get(str(body.get("event_type")))
        if definition is not None and definition.reserved:
            raise ControlError("refused", f"{definition} is recorded by {definition.by}, never by a task")
        payload = dict(body.get("payload") or {})
        try:
            events.check(str(body["event_type"]), payload)
        except events.EventSchemaError as exc:
            raise ControlError("bad", str(exc)) from None
        event = self.appender().record(key, str(body["event_type"]), actor=str(body.get("actor") or "airflow"),
                                       payload=payload)
        return event.to_dict()

    def events(self, identity: TaskIdentity, body: dict[str, Any]) -> list[dict[str, Any]]:
        from airflow_finetune_gov import common

        for field in ("dag_id", "run_id"):
            if body.get(field) not in (None, getattr(identity, field)):
                raise ControlError("refused", f"a task reads its own run's lineage only ({identity.dag_id}/"
                                              f"{identity.run_id}), not {field} {body.get(field)!r}")
        found = common.lineage_store().events(dag_id=identity.dag_id, run_id=identity.run_id,
                                              event_type=body.get("event_type"), event_prefix=body.get("event_prefix"))
        return [e.to_dict() for e in found]

    def login(self, identity: TaskIdentity, body: dict[str, Any]) -> dict[str, Any]:
        from airflow_finetune_gov.credentials.hook import GovernedLeaseHook

        role, purpose = str(body.get("role") or ""), str(body.get("purpose") or "")
        extra = {str(k): str(v) for k, v in (body.get("extra") or {}).items()}
        self._authorize_login(identity, role, purpose, extra)
        client = GovernedLeaseHook().client(identity, role=role, purpose=purpose, extra=extra or None)
        return {"token": client.token}

    def _authorize_login(self, identity: TaskIdentity, role: str, purpose: str, extra: dict[str, str]) -> None:
        from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval
        from airflow_finetune_gov.credentials.operators import PLANE_SERVICES, SERVICE_SCOPES
        from airflow_finetune_gov.vault.bootstrap import (
            ENDPOINTS_ROLE,
            PROVENANCE_ROLE,
            REVOKER_ROLE,
            lease_role_name,
            tune_role_name,
        )

        if role in PLANE_SERVICES:
            raise ControlError("refused", f"the {role} role reads training rows for the policy check's screening, "
                                          "which the control plane runs itself: a task never holds it")
        if role in SERVICE_SCOPES:
            if purpose != role or extra:
                raise ControlError("refused", f"the {role} role is logged in to with purpose {role} and no claims")
            return
        if role == REVOKER_ROLE:
            raise ControlError("refused", "revocation is the control plane's own: ask it to revoke the run's leases "
                                          "(/v1/leases/revoke), never for the revoker's identity")
        if role == ENDPOINTS_ROLE:
            raise ControlError("refused", "model endpoints' keys are read by the control plane itself, to evaluate a "
                                          "remote model and check its job with the provider: a task never holds them")
        if role == PROVENANCE_ROLE:
            raise ControlError("refused", "provenance is signed by the control plane itself, for a version its own "
                                          "evaluation passed: a task never holds the signing identity")
        try:
            approval = granted_approval(self._run_events(identity), identity.run_id, _approvers_now(identity.dag_id))
        except ApprovalMissing as exc:
            raise ControlError("refused", f"no {role} login for {identity.subject}: {exc}") from None
        dataset = extra.get("dataset", "")
        if approval.get("change") == "finetune" and dataset == approval.get("dataset"):
            if role == lease_role_name(dataset) and purpose == "lease" and \
                    extra.get("approval_id") == approval["approval_id"] and set(extra) == {"dataset", "approval_id"}:
                return
            if role == tune_role_name(dataset) and purpose == "tune" and set(extra) == {"dataset"}:
                return
        raise ControlError("refused", f"no {role} login (purpose {purpose}, claims {sorted(extra)}) for "
                                      f"{identity.subject}: the run's approval is for dataset "
                                      f"{approval.get('dataset')!r} ({approval.get('change')})")

    def _run_events(self, identity: TaskIdentity) -> list[Any]:
        """The calling task's chain of events in the newest incarnation of its run (a running task is always
        in the newest: a run re-created under the same run id starts after it)."""
        from airflow_finetune_gov import common
        from airflow_finetune_gov.lineage.runs import newest
        from airflow_finetune_gov.lineage.store import chain_of

        mine = chain_of(identity.task_id, identity.map_index)
        events = newest(common.lineage_store().events(dag_id=identity.dag_id, run_id=identity.run_id))
        return [e for e in events if e.chain == mine]

    def revoke(self, identity: TaskIdentity, body: dict[str, Any], log_: CapturingLog) -> list[dict[str, Any]]:
        from airflow_finetune_gov.credentials.operators import revoke_run_leases

        lease_ids = body.get("lease_ids")
        return revoke_run_leases(service_context(identity, log_), reason=str(body.get("reason") or "teardown"),
                                 purposes=tuple(body.get("purposes") or ("training",)),
                                 lease_ids=set(lease_ids) if lease_ids is not None else None,
                                 fallback=body.get("fallback"))

    def execute(self, identity: TaskIdentity, body: dict[str, Any], log_: CapturingLog) -> Any:
        """Run one of :data:`PLANE_OPERATORS` here, as the calling task, with the arguments it sent."""
        import importlib

        from airflow_finetune_gov import common
        from airflow_finetune_gov.lineage.runs import RUN_STARTED, RunNotWitnessed, requested_by

        name = str(body.get("operator") or "")
        method = "execute"
        step_fields: tuple[str, ...] = ()
        fields: tuple[str, ...]
        if name in PLANE_STEPS:
            module, cls_name, fields, method, step_fields = PLANE_STEPS[name]
        elif name in PLANE_OPERATORS:
            module, cls_name, fields = PLANE_OPERATORS[name]
        else:
            raise ControlError("bad", f"no operator {name!r} runs in the control plane: "
                                      f"{sorted({*PLANE_OPERATORS, *PLANE_STEPS})}")
        params = dict(body.get("params") or {})
        unknown = set(params) - set(fields)
        if unknown:
            raise ControlError("bad", f"{cls_name} takes {list(fields)}, not {sorted(unknown)}")
        run = common.lineage_store().events(dag_id=identity.dag_id, run_id=identity.run_id, event_prefix="run.")
        starts = [e for e in run if e.event_type == RUN_STARTED]
        if not starts:
            raise RunNotWitnessed(f"run {identity.dag_id}/{identity.run_id} has no run.started record from the "
                                  "scheduler: nothing can be decided for it (see the README's limits)")
        started = starts[-1].payload_dict()
        # The requester as the api-server saw them trigger it; else (a run not triggered through the API) the
        # scheduler's reading of the metadata database
        started["triggering_user_name"] = requested_by(run) or started.get("triggering_user_name")
        if params.get("response_timeout") is not None:
            from datetime import timedelta

            params["response_timeout"] = timedelta(seconds=float(params["response_timeout"]))
        step: dict[str, Any] = {k: params.pop(k) for k in step_fields if k in params}
        if "owners" in step:
            step["owners"] = [str(o) for o in step["owners"] or []]
        cls = getattr(importlib.import_module(module), cls_name)
        op = cls(task_id=identity.task_id.rpartition(".")[2], **params)
        op._log = log_  # what it logs goes back to the task's log
        return getattr(op, method)(service_context(identity, log_, started, task=op), **step)

    # --- the model store: only the control plane writes it ------------------------------------------
    @staticmethod
    def _staging(identity: TaskIdentity) -> Path:
        from airflow_finetune_gov import settings
        from airflow_finetune_gov.registry.store import STAGING

        name = hashlib.sha256(json.dumps(asdict(identity), sort_keys=True).encode()).hexdigest()[:32]
        return Path(settings.get("model_store")) / STAGING / name

    def staging(self, identity: TaskIdentity, uid: int, gid: int) -> dict[str, Any]:
        """A directory for this task try's tuned files, owned by the calling user: created here, in a
        directory only the control plane writes, so nothing in its path is the task's but its contents."""
        import shutil

        folder = self._staging(identity)
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.parent.chmod(0o711)  # reachable, not listable
        if folder.exists():
            shutil.rmtree(folder)  # a task try stages once: what an earlier call left is not its result
        folder.mkdir()
        if os.geteuid() == 0:
            os.chown(folder, uid, gid)
            folder.chmod(0o700)
        else:  # the control plane's own user is in the DAG user's group: the folder is that group's, and its own
            os.chown(folder, -1, gid)
            folder.chmod(0o770)
        return {"path": str(folder)}

    def store_model(self, identity: TaskIdentity, uid: int, body: dict[str, Any]) -> dict[str, Any]:
        """Copy the files the task staged into the store as a new version, record ``model.stored`` and drop the
        staging directory. Only the task's own regular files are taken (no symlink is followed); the base the
        task names must be in the store, match its manifest, and be the approved base version when the
        decision names one."""
        import shutil

        from airflow_finetune_gov import settings
        from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval
        from airflow_finetune_gov.lineage import events
        from airflow_finetune_gov.lineage.store import EventKey
        from airflow_finetune_gov.registry.store import ModelStore, RegistryError

        try:
            name, files = str(body["name"]), [str(f) for f in body["files"]]
            base_model = str(body["base_model"])
            base_version = str(body["base_version"]) if body.get("base_version") else None
        except (KeyError, TypeError) as exc:
            raise ControlError("bad", f"storing a model needs name, files, base_model, base_version: {exc}") from None
        store = ModelStore(settings.get("model_store"))
        folder = self._staging(identity)
        try:  # whatever the outcome, the staged files go: a refused hand-over leaves nothing behind
            try:
                approval = granted_approval(self._run_events(identity), identity.run_id,
                                            _approvers_now(identity.dag_id))
            except ApprovalMissing as exc:
                raise ControlError("refused", f"no model is stored for {identity.subject}: {exc}") from None
            if approval["model"] not in (base_model, name):
                raise ControlError("refused", f"the task tuned {base_model!r} into {name!r}; this run was approved "
                                              f"for {approval['model']!r}")
            if approval.get("base_version") and approval["base_version"] != base_version:
                raise ControlError("refused", f"the base {base_model}@{base_version} is not the approved base "
                                              f"version {approval['base_version']}")
            problems = store.verify(base_model, base_version) if base_version else []
            if problems:
                raise ControlError("refused", f"the base {base_model}@{base_version} does not match its manifest: "
                                              f"{problems}")
            metadata = {**dict(body.get("metadata") or {}), "base_model": base_model, "base_version": base_version,
                        "run": f"{identity.dag_id}/{identity.run_id}", "stored_by": "control plane",
                        "task": identity.subject, "approval_id": approval["approval_id"]}
            manifest = store.put_dir(name, folder, files, metadata, owner_uid=uid)
        except RegistryError as exc:
            raise ControlError("refused", f"model {name} not stored: {exc}") from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        key = EventKey(identity.dag_id, identity.run_id, identity.task_id, identity.try_number, identity.map_index)
        size = sum((store.path(name, manifest["version"]) / f).stat().st_size for f in manifest["files"])
        payload = {"model": name, "version": manifest["version"], "sha256": manifest["sha256"],
                   "files": len(manifest["files"]), "bytes": size, "base_model": base_model,
                   "base_version": base_version}
        events.check("model.stored", payload)
        self.appender().record(key, "model.stored", actor="control-plane", payload=payload)
        return manifest

    def remote_model(self, identity: TaskIdentity, body: dict[str, Any]) -> dict[str, Any]:
        """Store a remote job's model as a version and record ``model.stored``, from what the provider says of the
        job (asked here, with the endpoints identity): the task names a job its run submitted, never the model."""
        from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval
        from airflow_finetune_gov.lineage import events
        from airflow_finetune_gov.lineage.store import EventKey
        from airflow_finetune_gov.registry.store import RegistryError
        from airflow_finetune_gov.tuning.backends import TuningError
        from airflow_finetune_gov.tuning.operators import remote_version

        try:
            name, job_id, base_model = str(body["name"]), str(body["remote_job_id"]), str(body["base_model"])
        except KeyError as exc:
            raise ControlError("bad", f"storing a remote model needs name, remote_job_id, base_model: {exc}") from None
        run = self._run_events(identity)
        try:
            approval = granted_approval(run, identity.run_id, _approvers_now(identity.dag_id))
        except ApprovalMissing as exc:
            raise ControlError("refused", f"no model is stored for {identity.subject}: {exc}") from None
        if approval["model"] not in (base_model, name):
            raise ControlError("refused", f"remote job {job_id} tuned {base_model!r} into {name!r}; this run was "
                                          f"approved for {approval['model']!r}: not stored")
        submitted = [e.payload_dict() for e in run if e.event_type == "tuning.submitted"]
        metadata = {**dict(body.get("metadata") or {}), "stored_by": "control plane", "task": identity.subject,
                    "approval_id": approval["approval_id"]}
        try:
            manifest, payload = remote_version(identity, submitted, name, job_id, base_model, metadata)
        except (TuningError, RegistryError) as exc:
            raise ControlError("refused", f"remote model of job {job_id} not stored: {exc}") from None
        except Exception as exc:  # OpenBao or the provider refusing (AirflowFailException): named, not a crash
            raise ControlError("refused", f"remote model of job {job_id} not stored: {exc}") from None
        key = EventKey(identity.dag_id, identity.run_id, identity.task_id, identity.try_number, identity.map_index)
        events.check("model.stored", payload)
        self.appender().record(key, "model.stored", actor="control-plane", payload=payload)
        return manifest

    def base_model(self, identity: TaskIdentity, body: dict[str, Any]) -> dict[str, Any]:
        """The manifest of a base model reference (the demo model is built here on first use)."""
        from airflow_finetune_gov import settings
        from airflow_finetune_gov.registry.store import ModelStore, RegistryError
        from airflow_finetune_gov.tuning.backends import resolve_base

        try:
            return resolve_base(ModelStore(settings.get("model_store")), str(body.get("ref") or ""))
        except (FileNotFoundError, RegistryError) as exc:
            raise ControlError("refused", str(exc)) from None

    def sweep(self, identity: TaskIdentity, body: dict[str, Any]) -> list[dict[str, Any]]:
        from airflow_finetune_gov.cli.main import _orm_run_state
        from airflow_finetune_gov.credentials.operators import run_sweep

        log.info("sweep asked by %s", identity.subject)
        return run_sweep(_orm_run_state, dry_run=bool(body.get("dry_run")))


def _route(plane: ControlPlane, path: str, pid: int, uid: int, delegation: str | None, body: dict[str, Any],
           log_: CapturingLog, gid: int = -1, known: dict[str, Registered] | None = None) -> Any:
    if path == "/v1/health":
        return {"tasks": len(plane.registry.registered())}
    if path == "/v1/tasks/register":
        return plane.register(uid, body)
    if path == "/v1/tasks/deregister":
        return plane.deregister(uid, body)
    task_calls: dict[str, Callable[[TaskIdentity], Any]] = {
        "/v1/whoami": lambda ident: asdict(ident),
        "/v1/tasks/delegate": lambda ident: plane.delegate(ident, body),
        "/v1/lineage/append": lambda ident: plane.append(ident, body),
        "/v1/lineage/events": lambda ident: plane.events(ident, body),
        "/v1/openbao/login": lambda ident: plane.login(ident, body),
        "/v1/leases/revoke": lambda ident: plane.revoke(ident, body, log_),
        "/v1/leases/sweep": lambda ident: plane.sweep(ident, body),
        "/v1/operators/execute": lambda ident: plane.execute(ident, body, log_),
        "/v1/models/staging": lambda ident: plane.staging(ident, uid, gid),
        "/v1/models/store": lambda ident: plane.store_model(ident, uid, body),
        "/v1/models/base": lambda ident: plane.base_model(ident, body),
        "/v1/models/remote": lambda ident: plane.remote_model(ident, body),
    }
    call = task_calls.get(path)
    if call is None:
        raise ControlError("bad", f"no such call {path}")
    if path == "/v1/tasks/delegate" and delegation:
        raise ControlError("denied", "a delegation cannot be delegated again")
    identity = plane.task(pid, uid, delegation, known)
    log_.who = identity.subject
    return call(identity)


def _answer(plane: ControlPlane, pid: int, uid: int, gid: int, data: bytes,
            known: dict[str, Registered] | None = None) -> bytes:
    """One request (``{"call", "body", "delegation"}``) answered: ``{"ok", "status", "result" | "error", "log"}``."""
    log_ = CapturingLog(f"pid {pid}")
    status, answer, path = 200, {}, "?"
    try:
        try:
            request = json.loads(data)
            path, body = str(request["call"]), dict(request.get("body") or {})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ControlError("bad", "a request is a JSON object with call and body") from None
        result = _route(plane, path, pid, uid, request.get("delegation") or None, body, log_, gid, known)
        answer = {"ok": True, "result": result}
    except ControlError as exc:
        status = {"denied": 403, "refused": 409, "bad": 400}.get(exc.kind, 400)
        answer = {"ok": False, "error": {"kind": exc.kind, "message": str(exc)}}
        log.warning("%s %s refused (%s): %s", log_.who, path, exc.kind, exc)
    except Exception as exc:  # the operator's own exceptions, named by class for the client to raise
        status = 500
        answer = {"ok": False, "error": {"kind": type(exc).__name__, "message": str(exc)[:4000]}}
        log.warning("%s %s failed: %s: %s", log_.who, path, type(exc).__name__, exc)
    answer["status"] = status
    answer["log"] = log_.lines
    return json.dumps(answer, default=str).encode()


class _Handler(socketserver.BaseRequestHandler):
    """One connection: requests and answers framed by their length (``client.FRAME``), answered in turn until
    the caller closes it. The caller is who the kernel says connected (``SO_PEERCRED``, fixed for the connection):
    the task it names is looked up on the first request and trusted while its registration stands."""

    server: _Server

    def handle(self) -> None:
        sock = self.request
        pid, uid, gid = peer_credentials(sock)
        known: dict[str, Registered] = {}
        while True:
            try:
                (size,) = FRAME.unpack(read_exactly(sock, FRAME.size))
                if size > MAX_BODY:
                    out = json.dumps({"ok": False, "status": 400, "log": [], "error": {
                        "kind": "bad", "message": f"request of {size} bytes is over {MAX_BODY}"}}).encode()
                    sock.sendall(FRAME.pack(len(out)) + out)
                    return
                out = _answer(self.server.plane, pid, uid, gid, read_exactly(sock, size), known)
                sock.sendall(FRAME.pack(len(out)) + out)
            except OSError:  # the caller went away (a closed connection, a killed task)
                return


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 256  # the listen backlog: socketserver's 5 refused the 6th concurrent caller (EAGAIN)
    plane: ControlPlane


def serve(socket_path: Path, plane: ControlPlane, *, ready: Callable[[], None] | None = None) -> None:
    """Serve until killed. The socket is reachable by every local user: who may do what is decided per call."""
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    socket_path.unlink(missing_ok=True)
    server = _Server(str(socket_path), _Handler)
    server.plane = plane
    socket_path.chmod(0o666)
    log.info("control plane listening on %s (task uid %s)", socket_path, plane.task_uid)
    if ready is not None:
        ready()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        socket_path.unlink(missing_ok=True)

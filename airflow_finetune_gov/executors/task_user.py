"""TaskUserLocalExecutor: the LocalExecutor, with every task in a new process under the DAG user.

Airflow's LocalExecutor runs a task in a fork of the scheduler: DAG code then runs as the scheduler's OS
user with a copy of its memory (the key that signs every Airflow token among it) and reads its files.
``run_as_user`` does not help: the task runner parses the DAG file before it switches user. This executor
keeps the LocalExecutor's worker pool, but a worker hands each workload to its **zygote**
(:mod:`airflow_finetune_gov.executors.zygote`): a process it started (``exec``, not a fork of the
scheduler) as ``[finetune_gov] task_user`` with ``[finetune_gov] task_airflow_home`` and an environment
built from nothing, which has imported Airflow's supervisor once and forks a fresh child per workload
(saving the ~1.2 s interpreter start and imports per task). The workload, with its one task token, goes
over a pipe, never on a command line that ``ps`` shows. ``run_as_task_user`` without a zygote starts a
new interpreter instead (``python -m airflow_finetune_gov.executors.run_workload``).

With a control plane configured, the worker registers the new process with it before the task can call,
and deregisters it when the process ends: the control plane then knows the caller of every request from
the kernel (``SO_PEERCRED`` and the process's ancestry). The scheduler must run as root to switch users.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import sys
from typing import Any

import structlog
from airflow.executors.local_executor import LocalExecutor, _get_executor_process_title_prefix

log = structlog.get_logger(__name__)
PASSED_ENV = ("LANG", "LC_ALL", "TZ", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "OMP_NUM_THREADS",
              "MKL_NUM_THREADS", "TORCH_NUM_THREADS", "FGOV_STACK_DIR")


class TaskUserError(RuntimeError):
    pass


def task_environment(user: pwd.struct_passwd, home: str) -> dict[str, str]:
    """The whole environment of a task process: nothing of the scheduler's but locale and thread settings."""
    env = {k: v for k, v in os.environ.items() if k in PASSED_ENV}
    env.update({"HOME": user.pw_dir if os.path.isdir(user.pw_dir) else home, "USER": user.pw_name,
                "LOGNAME": user.pw_name, "AIRFLOW_HOME": home, "PYTHONUNBUFFERED": "1",
                "PATH": f"{os.path.dirname(sys.executable)}:/usr/local/bin:/usr/bin:/bin"})
    return env


def _task_user(user: str) -> pwd.struct_passwd:
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise TaskUserError(f"[finetune_gov] task_user {user!r} is no OS user: create it (useradd --system "
                            f"{user}) or let `fgov stack up` do it") from None
    if entry.pw_uid == 0:
        raise TaskUserError("[finetune_gov] task_user may not be root: DAG code would run with every key")
    return entry


def _registration(workload: Any) -> dict[str, Any] | None:
    ti = getattr(workload, "ti", None)
    if ti is None:
        return None
    return {"ti_id": str(ti.id), "dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id,
            "try_number": int(ti.try_number), "map_index": -1 if getattr(ti, "map_index", None) is None
            else int(ti.map_index)}


class Zygote:
    """One worker's zygote (:mod:`airflow_finetune_gov.executors.zygote`), started on first use."""

    def __init__(self, user: str, home: str) -> None:
        self.entry = _task_user(user)
        self.home = home
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "airflow_finetune_gov.executors.zygote", str(cmd_r), str(res_w)],
            stdin=subprocess.DEVNULL, env=task_environment(self.entry, self.home), cwd=self.home,
            user=self.entry.pw_uid, group=self.entry.pw_gid, extra_groups=[], umask=0o027,
            pass_fds=(cmd_r, res_w))
        os.close(cmd_r)
        os.close(res_w)
        self._cmd = cmd_w
        self._res = os.fdopen(res_r, "rb")

    def run(self, workload: Any, plane: Any) -> int:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        data = workload.model_dump_json().encode()
        os.write(self._cmd, len(data).to_bytes(4, "big") + data)
        started = self._res.readline().split()
        if len(started) != 2 or started[0] != b"pid":
            self.proc = None
            raise TaskUserError(f"the task user's zygote did not start the workload (it said {started!r})")
        pid = int(started[1])
        registration = _registration(workload)
        if plane is not None and registration is not None:
            plane.register(pid, registration)
        try:
            ended = self._res.readline().split()
        finally:
            if plane is not None and registration is not None:
                try:
                    plane.deregister(pid)
                except Exception:
                    log.exception("could not deregister task process", pid=pid)
        if len(ended) != 2 or ended[0] != b"exit":
            self.proc = None
            raise TaskUserError(f"the task user's zygote ended during workload {workload.display_name}")
        return int(ended[1])


def run_as_task_user(workload: Any, *, user: str, home: str, socket_path: str | None,
                     zygote: Zygote | None = None) -> int:
    """Run one workload as ``user`` (through ``zygote`` when given, else in a new interpreter); return its
    exit code."""
    entry = _task_user(user)
    from airflow_finetune_gov.control.client import ControlPlaneClient

    plane = ControlPlaneClient(socket_path) if socket_path else None
    if zygote is not None:
        return zygote.run(workload, plane)
    proc = subprocess.Popen(
        [sys.executable, "-m", "airflow_finetune_gov.executors.run_workload"],
        stdin=subprocess.PIPE, env=task_environment(entry, home), cwd=home, user=entry.pw_uid,
        group=entry.pw_gid, extra_groups=[], umask=0o027, close_fds=True)
    registered = False
    try:
        registration = _registration(workload)
        if plane is not None and registration is not None:
            plane.register(proc.pid, registration)
            registered = True
        assert proc.stdin is not None
        proc.stdin.write(workload.model_dump_json().encode())
        proc.stdin.close()
        return proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    finally:
        if registered and plane is not None:
            try:
                plane.deregister(proc.pid)
            except Exception:
                log.exception("could not deregister task process", pid=proc.pid)


def _run_worker(logger_name: str, input: Any, output: Any, unread_messages: Any, team_conf: Any,
                user: str, home: str, socket_path: str | None) -> None:
    """:func:`airflow.executors.local_executor._run_worker`, running each workload as the task user."""
    import signal

    from setproctitle import setproctitle

    from airflow_finetune_gov.executors.zygote import TermWhenIdle

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Under the LocalExecutor the worker is the task's supervisor and waits for it on SIGTERM; here the
    # supervisor is the zygote's child: keep waiting for it (its on_kill reaches the control plane through
    # its registration), then stop.
    busy = TermWhenIdle()
    wlog = structlog.get_logger(logger_name)
    prefix = _get_executor_process_title_prefix(team_conf.team_name)
    zygote = Zygote(user, home)
    while True:
        setproctitle(f"{prefix} <idle>")
        try:
            workload = input.get()
        except EOFError:
            break
        if workload is None:
            return
        with unread_messages:
            unread_messages.value -= 1
        if workload.running_state is not None:
            output.put((workload.key, workload.running_state, None))
        setproctitle(f"{prefix} {workload.display_name} (as {user})")
        busy.running = True
        try:
            code = run_as_task_user(workload, user=user, home=home, socket_path=socket_path, zygote=zygote)
            if code != 0:
                wlog.warning("workload process exited", code=code, workload=workload.display_name)
            output.put((workload.key, workload.success_state if code == 0 else workload.failure_state, None))
        except Exception as e:
            wlog.exception("Workload execution failed.", workload_type=type(workload).__name__)
            output.put((workload.key, workload.failure_state, e))
        finally:
            busy.running = False
        if busy.stop:
            return


class TaskUserLocalExecutor(LocalExecutor):
    """Set ``[core] executor = airflow_finetune_gov.executors.TaskUserLocalExecutor`` and
    ``[finetune_gov] task_user`` / ``task_airflow_home``."""

    def start(self) -> None:
        from airflow_finetune_gov import settings

        self._task_user = settings.get("task_user")
        self._task_home = settings.get("task_airflow_home")
        self._socket = settings.get("control_plane_socket", required=False) or None
        if os.geteuid() != 0:
            raise TaskUserError("TaskUserLocalExecutor runs tasks as [finetune_gov] task_user and must itself run "
                                "as root (the scheduler's user)")
        pwd.getpwnam(self._task_user)  # fail at start, not at the first task
        super().start()

    def _spawn_worker(self) -> None:
        import multiprocessing

        p = multiprocessing.Process(target=_run_worker, kwargs={
            "logger_name": self.log.name, "input": self.activity_queue, "output": self.result_queue,
            "unread_messages": self._unread_messages, "team_conf": self.conf,
            "user": self._task_user, "home": self._task_home, "socket_path": self._socket})
        p.start()
        assert p.pid
        self.workers[p.pid] = p

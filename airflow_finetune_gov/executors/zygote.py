"""The task user's zygote: a process started (exec'd) as ``[finetune_gov] task_user`` by one worker of
:class:`~airflow_finetune_gov.executors.task_user.TaskUserLocalExecutor`, which imports Airflow's task
supervisor once and then forks one fresh child per workload, so a task does not pay the interpreter start
and Airflow's imports (about 1.2 s here) every time.

It never runs DAG code itself (each workload runs in a child, which parses the DAG file), holds nothing a
task may not hold (it runs as the task user, with the task environment), and is non-dumpable, so its
children cannot ``ptrace`` it to reach the next task's workload. Protocol, on two inherited pipes (never on
stdout, where the children's logs go): the worker sends a 4-byte big-endian length and the workload's
JSON; the zygote answers ``pid N`` when the child exists and ``exit CODE`` when it has ended.
"""

from __future__ import annotations

import os
import struct
import sys
import traceback

PRELOADED = ("airflow.executors.base_executor", "airflow.sdk.execution_time.execute_workload",
             "airflow.sdk.execution_time.supervisor")


class TermWhenIdle:
    """SIGTERM for a process that waits on a workload: it exits at once when idle; while ``running`` it only
    sets ``stop``, so the workload (and its task's ``on_kill``) ends first and the caller stops after it."""

    def __init__(self) -> None:
        import signal

        self.running = False
        self.stop = False
        signal.signal(signal.SIGTERM, self._on_term)

    def _on_term(self, signum: int, frame: object) -> None:
        if not self.running:
            os._exit(0)
        self.stop = True


def _read_exact(fd: int, n: int) -> bytes:
    chunks = []
    while n:
        chunk = os.read(fd, n)
        if not chunk:
            return b""
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _child(data: bytes, decoder: object) -> int:
    from airflow.sdk.execution_time.execute_workload import execute_workload

    try:
        execute_workload(decoder.validate_json(data))  # type: ignore[attr-defined]
        return 0
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        return 1


def main() -> int:
    cmd_fd, res_fd = int(sys.argv[1]), int(sys.argv[2])
    # What every workload needs, imported once here (no DAG code: DAG files are parsed in each child)
    import importlib

    for module in PRELOADED:
        importlib.import_module(module)
    from airflow.executors import workloads
    from pydantic import TypeAdapter

    decoder = TypeAdapter[workloads.All](workloads.All)
    try:
        import ctypes

        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
    except (OSError, AttributeError):
        pass
    import signal

    # SIGTERM (the scheduler stopping: its whole process group gets it) must not take the zygote down while
    # a workload runs, or the worker stops waiting and the scheduler's exit kills the supervisor before the
    # task's on_kill has run: wait for the running child, then go.
    state = TermWhenIdle()
    while True:
        if state.stop:
            return 0
        header = _read_exact(cmd_fd, 4)
        if not header:
            return 0  # the worker closed its end: the executor is ending
        data = _read_exact(cmd_fd, struct.unpack(">I", header)[0])
        state.running = True
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the supervisor installs its own
            os.close(cmd_fd)
            os.close(res_fd)
            code = 1
            try:
                code = _child(data, decoder)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.write(res_fd, f"pid {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        state.running = False
        os.write(res_fd, f"exit {os.waitstatus_to_exitcode(status)}\n".encode())


if __name__ == "__main__":
    sys.exit(main())

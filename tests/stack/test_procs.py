from __future__ import annotations

import socket
import sys
import time

import psutil

from airflow_finetune_gov.stack.procs import ProcRecord, port_free, spawn, stop


def test_stop_takes_the_whole_process_group(tmp_path) -> None:
    code = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    record = spawn("parent", [sys.executable, "-c", code], log=tmp_path / "p.log")
    for _ in range(50):
        children = psutil.Process(record.pid).children(recursive=True)
        if children:
            break
        time.sleep(0.1)
    assert children, "the parent did not start its child"
    stop(record, timeout=5)
    assert not record.alive()
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


def test_a_recycled_pid_is_not_ours(tmp_path) -> None:
    record = spawn("sleeper", ["sleep", "30"], log=tmp_path / "s.log")
    impostor = ProcRecord(name="x", pid=record.pid, create_time=record.create_time - 100, log="")
    assert record.alive() and not impostor.alive()
    stop(record, timeout=5)
    assert not record.alive()


def test_port_free_sees_a_listener() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not port_free(s.getsockname()[1])

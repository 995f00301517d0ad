"""The backend interface with real processes and threads (no stack needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from airflow_finetune_gov.registry.store import ModelStore
from airflow_finetune_gov.tuning import backends
from airflow_finetune_gov.tuning.backends import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    CommandBackend,
    TuningError,
    TuningRequest,
)

ROWS = [("q1", "a1"), ("q2", "a2")]


def wait(job, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while (status := job.poll()) == RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    return status


def request(tmp_path: Path, lines: list[str], **hp) -> TuningRequest:
    return TuningRequest(base_model="some-base", base_dir=None, rows=ROWS, hyperparameters=hp,
                         work_dir=tmp_path, env={"PGUSER": "v-role", "PGPASSWORD": "s3cr3t-leased"},
                         log=lines.append)


TRAINER = textwrap.dedent("""
    import json, os, sys
    rows = [json.loads(l) for l in open(os.environ["FGOV_TRAIN_FILE"])]
    print("rows", len(rows), "user", os.environ["PGUSER"], flush=True)
    print("secrets", sorted(k for k in os.environ if k in ("AIRFLOW_CONN_X", "VAULT_TOKEN", "MY_API_KEY")))
    print("argv", sys.argv[1:])
    out = os.environ["FGOV_OUTPUT_DIR"]
    open(os.path.join(out, "model.bin"), "wb").write(b"weights")
    json.dump({"final_loss": 0.5}, open(os.path.join(out, "metrics.json"), "w"))
""")


def test_command_gets_credentials_in_its_environment_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_X", "postgresql://u:p@h/d")
    monkeypatch.setenv("VAULT_TOKEN", "hvs.worker")
    monkeypatch.setenv("MY_API_KEY", "k")
    lines: list[str] = []
    job = CommandBackend().start(request(tmp_path, lines, command=[sys.executable, "-c", TRAINER, "--epochs", "1"]))
    assert wait(job) == SUCCEEDED
    result = job.result()
    assert result.files == {"model.bin": b"weights", "metrics.json": b'{"final_loss": 0.5}'}
    assert result.metrics == {"final_loss": 0.5}
    assert "[trainer] rows 2 user v-role" in lines
    assert "[trainer] secrets []" in lines  # the worker's own secrets are not inherited
    assert "[trainer] argv ['--epochs', '1']" in lines
    assert not any("s3cr3t-leased" in line for line in lines)
    assert oct((tmp_path / "train.jsonl").stat().st_mode & 0o777) == "0o600"


def test_command_failure_reports_its_last_output(tmp_path: Path) -> None:
    job = CommandBackend().start(request(tmp_path, [], command=[
        sys.executable, "-c", "print('loading'); print('CUDA out of memory'); raise SystemExit(3)"]))
    assert wait(job) == FAILED
    with pytest.raises(TuningError, match=r"code 3; last output:\nloading\nCUDA out of memory"):
        job.result()


def test_command_that_writes_nothing_fails(tmp_path: Path) -> None:
    job = CommandBackend().start(request(tmp_path, [], command=[sys.executable, "-c", "pass"]))
    assert wait(job) == SUCCEEDED
    with pytest.raises(TuningError, match="wrote nothing"):
        job.result()


def test_command_without_argv_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(TuningError, match=r"command=\["):
        CommandBackend().start(request(tmp_path, []))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead
        return fh.read().split(") ")[1][0] != "Z"


def test_cancel_kills_the_trainer_and_its_children(tmp_path: Path) -> None:
    script = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);" \
             "print('started', flush=True); time.sleep(60)"
    lines: list[str] = []
    job = CommandBackend(kill_grace=2).start(request(tmp_path, lines, command=[sys.executable, "-c", script]))
    deadline = time.monotonic() + 20
    while "[trainer] started" not in lines and time.monotonic() < deadline:
        time.sleep(0.05)
    children = subprocess.run(["pgrep", "-g", str(job.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 2
    job.cancel()
    assert job.poll() == CANCELLED
    time.sleep(0.2)
    assert not any(alive(int(pid)) for pid in children)


def test_trainer_dies_when_its_task_process_is_killed(tmp_path: Path) -> None:
    """SIGKILL gives on_kill no chance: the trainer must still not outlive the task process."""
    marker = tmp_path / "trainer.pid"
    task = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from airflow_finetune_gov.tuning.backends import CommandBackend, TuningRequest
        req = TuningRequest(base_model="b", base_dir=None, rows=[("q", "a")], work_dir=Path({str(tmp_path)!r}),
                            hyperparameters={{"command": [sys.executable, "-c",
                              "import os, time; open({str(marker)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]}})
        job = CommandBackend().start(req)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", task])
    deadline = time.monotonic() + 30
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    trainer = int(marker.read_text())
    assert alive(trainer)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 10
    while alive(trainer) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(trainer)


def test_resolve_base_names_what_is_missing(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(FileNotFoundError, match="base model 'nope' is not in the model store"):
        backends.resolve_base(store, "nope")
    m = store.put("mine", {"w": b"1"}, {"kind": "base"})
    with pytest.raises(FileNotFoundError):
        backends.resolve_base(store, "mine")  # no `base` alias yet
    assert backends.resolve_base(store, f"mine@{m['version']}")["version"] == m["version"]
    store.set_alias("mine", "base", m["version"], by="t", run="r")
    assert backends.resolve_base(store, "mine")["sha256"] == m["sha256"]


def test_demo_base_is_built_once_per_store(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    first = backends.resolve_base(store, backends.DEMO_MODEL)
    again = backends.resolve_base(store, backends.DEMO_MODEL)
    assert first == again and first["metadata"]["kind"] == "base"
    assert store.verify(backends.DEMO_MODEL, first["version"]) == []
    assert json.loads((store.path(backends.DEMO_MODEL, first["version"]) / "config.json").read_text())[
        "model_type"] == "gpt2"


def test_a_demo_base_from_an_older_recipe_is_replaced_and_the_move_recorded(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    old = store.put(backends.DEMO_MODEL, {"config.json": b"{}"}, {"kind": "base", "training": {"recipe": "old"}})
    store.set_alias(backends.DEMO_MODEL, "base", old["version"], by="fgov", run="demo-base-build")
    new = backends.resolve_base(store, backends.DEMO_MODEL)
    assert new["version"] != old["version"] and new["metadata"]["training"]["recipe"] != "old"
    history = store.aliases(backends.DEMO_MODEL)["_history"]
    assert [(h["from"], h["to"]) for h in history][-1] == (old["version"], new["version"])


def test_unknown_backend_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="available: command, local_peft"):
        backends.get_backend("axolotl")


def test_inline_job_runs_in_the_callers_thread_and_can_be_cancelled() -> None:
    import threading

    ran_in: list[str] = []

    def work(cancel):
        ran_in.append(threading.current_thread().name)
        return backends.TuningResult(metrics={"ok": 1})

    job = backends.InlineJob(work)
    assert job.poll() == RUNNING and ran_in == []  # starts on the first wait
    job.wait(0.1)
    assert job.poll() == SUCCEEDED and ran_in == [threading.current_thread().name]
    assert job.result().metrics == {"ok": 1}

    def steps(cancel):
        for _ in range(100):
            if cancel.is_set():
                raise backends.TuningError("cancelled")
            cancel.set()  # as on_kill would, from the SIGTERM handler between two steps
        return backends.TuningResult()

    stopped = backends.InlineJob(steps)
    stopped.wait(0.1)
    assert stopped.poll() == CANCELLED
    with pytest.raises(TuningError, match="cancelled"):
        stopped.result()

    def ignores_cancel(cancel):  # a backend that returns anyway once told to stop
        cancel.set()
        return backends.TuningResult(metrics={"half": 1})

    stubborn = backends.InlineJob(ignores_cancel)
    stubborn.wait(0.1)
    assert stubborn.poll() == CANCELLED  # never counted as done
    with pytest.raises(TuningError, match="cancelled"):
        stubborn.result()

    def boom(cancel):
        raise RuntimeError("no memory")

    bad = backends.InlineJob(boom)
    bad.wait(0.1)
    assert bad.poll() == FAILED
    with pytest.raises(TuningError, match="no memory"):
        bad.result()
    never = backends.InlineJob(work)
    never.cancel()
    never.wait(0.1)
    assert never.poll() == CANCELLED and len(ran_in) == 1

"""The openai_compatible backend and its trigger against a local server implementing the fine-tuning
endpoints (the login to OpenBao is exercised on the real stack, tests/integration/test_openai_on_stack.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FAIL_MODEL, FakeFineTuningAPI

from airflow_finetune_gov.tuning.backends import CANCELLED, FAILED, RUNNING, SUCCEEDED, TuningError, TuningRequest
from airflow_finetune_gov.tuning.openai_compatible import (
    FineTuningClient,
    OpenAICompatibleBackend,
    RemoteJob,
    hyperparameters,
    training_jsonl,
)
from airflow_finetune_gov.tuning.triggers import RemoteFineTuningTrigger

KEY = "sk-test-" + "k3y" * 8
ROWS = [("What are Acme's support hours?", "Mon-Fri 9-17."), ('Say "hi"\nplease', "hi")]


def request(api: FakeFineTuningAPI, tmp_path: Path, key: str = KEY, model: str = "gpt-fake-mini",
            hp: dict[str, Any] | None = None, log: list[str] | None = None) -> TuningRequest:
    return TuningRequest(base_model=model, base_dir=None, rows=ROWS, hyperparameters=hp or {"epochs": 3},
                         work_dir=tmp_path, env={"OPENAI_API_KEY": key, "OPENAI_BASE_URL": api.base_url},
                         log=(log if log is not None else []).append)


def run_to_end(job: Any) -> str:
    status = job.poll()
    for _ in range(20):
        if status != RUNNING:
            break
        status = job.poll()
    return status


def test_hyperparameters_are_checked_and_typed() -> None:
    assert hyperparameters({"epochs": "3", "learning_rate_multiplier": 0.5, "suffix": "acme"}) == \
        {"epochs": 3, "learning_rate_multiplier": 0.5, "suffix": "acme"}
    with pytest.raises(ValueError, match=r"unknown hyperparameter\(s\) \['lora_r'\]"):
        hyperparameters({"lora_r": 8})
    with pytest.raises(ValueError, match=r"epochs=500 is out of range \[1, 50\]"):
        hyperparameters({"epochs": 500})
    with pytest.raises(ValueError, match="batch_size must be int"):
        hyperparameters({"batch_size": "many"})
    with pytest.raises(ValueError, match="suffix must be 1-64"):
        hyperparameters({"suffix": ""})


def test_training_file_is_chat_jsonl_of_exactly_the_rows() -> None:
    lines = training_jsonl(ROWS).decode().splitlines()
    assert [json.loads(line)["messages"] for line in lines] == [
        [{"role": "user", "content": p}, {"role": "assistant", "content": r}] for p, r in ROWS]


def test_backend_uploads_creates_a_job_and_follows_it_to_the_model(tmp_path: Path) -> None:
    log: list[str] = []
    with FakeFineTuningAPI(KEY) as api:
        job = OpenAICompatibleBackend().start(request(api, tmp_path, hp={"epochs": 3, "seed": 7}, log=log))
        assert isinstance(job, RemoteJob) and job.job_id in api.jobs
        assert api.uploaded_rows(job.training_file) == ROWS
        created = api.jobs[job.job_id]
        assert created["method"] == {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 3}}}
        assert created["seed"] == 7
        assert run_to_end(job) == SUCCEEDED
        result = job.result()
        assert result.remote_model == f"ft:gpt-fake-mini:fgov::{job.job_id[-8:]}"
        assert result.kind == "remote" and result.files is None and result.metrics["trained_tokens"] > 0
        assert job.deferral() == {"base_url": api.base_url, "job_id": job.job_id}
        assert api.refused == 0
    remote = [line for line in log if line.startswith("[remote]")]
    assert remote == ["[remote] info: Validating training file", "[remote] info: Fine-tuning job started",
                      "[remote] info: Step 1/1: training loss=0.42",
                      "[remote] info: The job has successfully completed"]  # each event once
    assert not any(KEY in line for line in log)


def test_a_refused_key_is_a_clear_error_that_does_not_repeat_the_key(tmp_path: Path) -> None:
    with FakeFineTuningAPI(KEY) as api:
        with pytest.raises(TuningError, match=r"POST .*/files -> HTTP 401: Incorrect API key provided \(the API "
                                              r"key was refused: check the secret in OpenBao\)") as err:
            OpenAICompatibleBackend().start(request(api, tmp_path, key="sk-wrong-0123456789"))
        assert "sk-wrong" not in str(err.value) and api.refused == 1 and not api.files
        with pytest.raises(TuningError, match="no API key"):
            OpenAICompatibleBackend().start(request(api, tmp_path, key=""))
    assert "sk-" not in repr(FineTuningClient("http://x", KEY))


def test_a_failed_remote_job_raises_with_the_services_reason(tmp_path: Path) -> None:
    with FakeFineTuningAPI(KEY) as api:
        job = OpenAICompatibleBackend().start(request(api, tmp_path, model=FAIL_MODEL))
        assert run_to_end(job) == FAILED
        with pytest.raises(TuningError, match="failed: Training file has too few examples"):
            job.result()


def test_cancel_stops_a_running_remote_job(tmp_path: Path) -> None:
    with FakeFineTuningAPI(KEY, hold=True) as api:
        job = OpenAICompatibleBackend().start(request(api, tmp_path))
        assert job.poll() == RUNNING
        job.cancel()
        assert api.cancelled == [job.job_id] and job.poll() == CANCELLED


class LocalKeyTrigger(RemoteFineTuningTrigger):
    """The real polling loop with the key handed in; the OpenBao login is the stack test's."""

    api: FakeFineTuningAPI

    def _login(self) -> FineTuningClient:
        return FineTuningClient(self.base_url, self.api.api_key)


def trigger(api: FakeFineTuningAPI, job_id: str) -> LocalKeyTrigger:
    t = LocalKeyTrigger(job_id=job_id, base_url=api.base_url, vault_addr="http://127.0.0.1:1",
                        identity={"dag_id": "d", "run_id": "r", "task_id": "t", "try_number": 1}, dataset="benign",
                        secret_path="openai", secret_mount="fgov-backends", jwt_mount="fgov-jwt", poll_interval=0.01)
    t.api = api
    return t


async def first_event(t: RemoteFineTuningTrigger) -> dict[str, Any]:
    async for event in t.run():
        return dict(event.payload)
    raise AssertionError("the trigger ended without an event")


def test_trigger_serialises_nothing_secret_and_fires_once_with_the_outcome(tmp_path: Path) -> None:
    with FakeFineTuningAPI(KEY) as api:
        job = OpenAICompatibleBackend().start(request(api, tmp_path))
        t = trigger(api, job.job_id)
        path, kwargs = RemoteFineTuningTrigger(**t.serialize()[1]).serialize()
        assert path == "airflow_finetune_gov.tuning.triggers.RemoteFineTuningTrigger"
        assert KEY not in json.dumps(kwargs) and kwargs["job_id"] == job.job_id
        event = asyncio.run(first_event(t))
        assert event == {"status": "succeeded", "job_id": job.job_id,
                         "fine_tuned_model": f"ft:gpt-fake-mini:fgov::{job.job_id[-8:]}",
                         "metrics": {k: api.jobs[job.job_id][k] for k in ("trained_tokens", "finished_at")},
                         "error": None}

        failing = OpenAICompatibleBackend().start(request(api, tmp_path, model=FAIL_MODEL))
        event = asyncio.run(first_event(trigger(api, failing.job_id)))
        assert event["status"] == "failed" and event["error"] == "Training file has too few examples"


def test_trigger_on_kill_cancels_the_remote_job(tmp_path: Path) -> None:
    with FakeFineTuningAPI(KEY, hold=True) as api:
        job = OpenAICompatibleBackend().start(request(api, tmp_path))
        asyncio.run(trigger(api, job.job_id).on_kill())
        assert api.cancelled == [job.job_id]


def test_trigger_gives_up_after_repeated_errors_with_an_error_event() -> None:
    with FakeFineTuningAPI(KEY) as api:
        t = trigger(api, "ftjob-missing")
        t.max_errors = 2
        event = asyncio.run(first_event(t))
    assert event["status"] == "error" and "HTTP 404" in event["error"]

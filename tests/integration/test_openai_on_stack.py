"""The openai_compatible backend on the real stack, against a local server implementing the documented
fine-tuning endpoints: the API key lives only in OpenBao, the task defers (no worker slot) while the
remote job runs, the triggerer logs in with its own workload identity to follow it, and killing the
deferred task cancels the remote job. Not run against a hosted service."""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress

import psutil
import pytest
from fake_openai import FAIL_MODEL, FakeFineTuningAPI
from support import StackView

from airflow_finetune_gov.stack.manager import Stack
from airflow_finetune_gov.tuning.backends import rows_sha256

pytestmark = pytest.mark.stack
DAG_ID = "governed_finetune_openai"


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


@pytest.fixture
def api(view: StackView) -> Iterator[tuple[FakeFineTuningAPI, str]]:
    """A fresh local API and its key, stored in OpenBao's backends mount under a path of its own."""
    key = "sk-fgov-" + secrets.token_urlsafe(24)
    path = f"openai-test-{uuid.uuid4().hex[:8]}"
    with FakeFineTuningAPI(key, hold=True) as fake:
        view.bao().secrets.kv.v2.create_or_update_secret(
            path=path, secret={"OPENAI_API_KEY": key, "OPENAI_BASE_URL": fake.base_url}, mount_point="fgov-backends")
        yield fake, path


def wait_for(condition, timeout: float = 120, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def haystacks(view: StackView, run_id: str) -> dict[str, str]:
    """Everything a leaked key could end up in: every log of the stack (but the test-only raw audit
    device, which records secrets by design), lineage, XCom, rendered fields."""
    found = {str(p): p.read_text(errors="replace") for p in view.stack.dir.rglob("*.log")
             if p.name != "audit-raw.log"}
    assert any("triggerer" in name for name in found) and len(found) > 5
    auditor = view.client("auditor")
    base = f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances"
    for entry in auditor.request("GET", f"{base}/~/xcomEntries").json()["xcom_entries"]:
        found[f"xcom {entry['task_id']}"] = json.dumps(
            auditor.request("GET", f"{base}/{entry['task_id']}/xcomEntries/{entry['key']}").json())
    found["rendered tune"] = json.dumps(auditor.request("GET", f"{base}/tune").json().get("rendered_fields"))
    found["lineage"] = json.dumps([e.to_dict() for e in view.events(run_id)])
    return found


def test_remote_tune_defers_and_records_the_remote_model(view: StackView,
                                                        api: tuple[FakeFineTuningAPI, str]) -> None:
    fake, path = api
    requester = view.client("requester")
    run_id = view.trigger(DAG_ID, secret=path)
    requester.wait_task_state(DAG_ID, run_id, "tune", {"deferred"}, timeout=240)
    job_id = view.events(run_id, "tuning.submitted")[0].payload_dict()["remote_job_id"]
    # the triggerer (not a worker) follows the job, with the key it read from OpenBao itself
    polls = fake.jobs[job_id]["polls"]
    wait_for(lambda: fake.jobs[job_id]["polls"] >= polls + 2, what="the trigger to poll the held job")
    assert requester.task_states(DAG_ID, run_id)["tune"] == "deferred"
    fake.release()
    final = requester.wait_run(DAG_ID, run_id, timeout=240)
    assert final == "success", (requester.task_states(DAG_ID, run_id),  # seen failing once in a full run
                                [(e.task_id, e.event_type) for e in view.events(run_id)],
                                view.task_log(DAG_ID, run_id, "tune")[-3000:])

    done = view.events(run_id, "tuning.completed")[0].payload_dict()
    job = fake.jobs[job_id]
    assert done["remote_model"] == job["fine_tuned_model"] == f"ft:gpt-fake-mini:fgov::{job_id[-8:]}"
    assert done["remote_job_id"] == job_id and done["kind"] == "remote" and done["version"] is None
    assert done["backend"] == "openai_compatible" and done["base_model"] == "gpt-fake-mini"
    assert done["metrics"]["trained_tokens"] == job["trained_tokens"]
    uploaded = fake.uploaded_rows(job["training_file"])  # exactly the rows whose hash was recorded
    assert len(uploaded) == done["rows"] > 0 and rows_sha256(uploaded) == done["content_sha256"]
    assert job["method"]["supervised"]["hyperparameters"] == {"n_epochs": 3}
    assert fake.refused == 0 and ("POST", "/v1/files") in fake.requests

    log = view.task_log(DAG_ID, run_id, "tune")
    assert f"deferring: the triggerer follows remote job {job_id}" in log
    issued = next(e.payload_dict() for e in view.events(run_id, "lease.issued") if e.task_id == "acquire_lease")
    assert view.role_count(issued["db_role"]) == 0  # revoked by the teardown
    leaks = [where for where, text in haystacks(view, run_id).items() if fake.api_key in text]
    assert leaks == []


def test_without_deferral_the_worker_polls_the_job(view: StackView, api: tuple[FakeFineTuningAPI, str]) -> None:
    fake, path = api
    fake.release()
    run_id, state, tasks = view.run(f"{DAG_ID}_polling", secret=path)
    assert state == "success", tasks
    submitted = view.events(run_id, "tuning.submitted")[0].payload_dict()
    done = view.events(run_id, "tuning.completed")[0].payload_dict()
    assert submitted["deferred"] is False and done["remote_job_id"] == submitted["remote_job_id"]
    assert done["remote_model"] == fake.jobs[submitted["remote_job_id"]]["fine_tuned_model"]
    log = view.task_log(f"{DAG_ID}_polling", run_id, "tune")
    assert "deferring" not in log and "[remote] info: The job has successfully completed" in log
    assert fake.api_key not in log and not view.events(run_id, "tuning.cancelled")


def test_a_failed_remote_job_fails_the_task_with_its_reason(view: StackView,
                                                           api: tuple[FakeFineTuningAPI, str]) -> None:
    fake, path = api
    fake.release()
    run_id, state, tasks = view.run(DAG_ID, secret=path, model=FAIL_MODEL)
    assert state == "failed" and tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    failed = view.events(run_id, "tuning.failed")[0].payload_dict()
    assert failed["status"] == "failed" and "Training file has too few examples" in failed["error"]
    assert not view.events(run_id, "tuning.completed")


def kill_deferred_tune(view: StackView, path: str) -> tuple[str, str]:
    """Trigger a run, wait until its tuning task is deferred, mark the task failed (a user's kill)."""
    requester = view.client("requester")
    run_id = view.trigger(DAG_ID, secret=path)
    requester.wait_task_state(DAG_ID, run_id, "tune", {"deferred"}, timeout=240)
    job_id = view.events(run_id, "tuning.submitted")[0].payload_dict()["remote_job_id"]
    return run_id, job_id


def mark_failed(view: StackView, run_id: str) -> None:
    resp = view.client("requester").request("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/tune",
                                            json={"new_state": "failed"})
    assert resp.status_code == 200, resp.text


def assert_settled(view: StackView, run_id: str, job_id: str, status_before: str) -> None:
    """The run failed, the teardown recorded the remote job's end and revoked the lease."""
    assert view.client("requester").wait_run(DAG_ID, run_id, timeout=240) == "failed"
    cancelled = [e.payload_dict() for e in view.events(run_id, "tuning.cancelled")]
    assert cancelled == [{"backend": "openai_compatible", "remote_job_id": job_id, "status_before": status_before,
                          "status": "cancelled", "by": "teardown"}]
    issued = next(e.payload_dict() for e in view.events(run_id, "lease.issued") if e.task_id == "acquire_lease")
    assert view.role_count(issued["db_role"]) == 0


@contextmanager
def paused(view: StackView, component: str) -> Iterator[None]:
    """SIGSTOP an Airflow component's process tree for the block (SIGCONT after)."""
    record = next(r for r in view.stack.records() if r.name == f"airflow-{component}")
    main = psutil.Process(record.pid)
    procs = [main, *main.children(recursive=True)]
    for p in procs:
        with suppress(psutil.NoSuchProcess):  # a short-lived child may be gone already
            p.suspend()
    try:
        yield
    finally:
        for p in procs:
            with suppress(psutil.NoSuchProcess):
                p.resume()


def test_killing_the_deferred_task_cancels_the_remote_job(view: StackView,
                                                          api: tuple[FakeFineTuningAPI, str]) -> None:
    fake, path = api
    run_id, job_id = kill_deferred_tune(view, path)
    wait_for(lambda: fake.jobs[job_id]["polls"] >= 2, what="the trigger to follow the job")
    with paused(view, "scheduler"):  # no teardown can run meanwhile: the cancel is the trigger's on_kill
        mark_failed(view, run_id)
        wait_for(lambda: job_id in fake.cancelled, what="the trigger's on_kill to cancel the remote job")
    assert_settled(view, run_id, job_id, status_before="cancelled")


def test_a_task_killed_before_its_trigger_ran_has_its_job_cancelled_by_the_teardown(
        view: StackView, api: tuple[FakeFineTuningAPI, str]) -> None:
    fake, path = api
    with paused(view, "triggerer"):  # no trigger runs, so no on_kill: only the teardown can cancel the job
        run_id, job_id = kill_deferred_tune(view, path)
        mark_failed(view, run_id)
        assert_settled(view, run_id, job_id, status_before="running")
    assert fake.cancelled == [job_id] and fake.jobs[job_id]["status"] == "cancelled"


def test_a_missing_backend_kv_path_is_refused_and_the_lease_revoked(view: StackView) -> None:
    run_id, state, tasks = view.run(DAG_ID, secret="no-such-secret")
    assert state == "failed" and tasks["tune"] == "failed", tasks
    refused = view.events(run_id, "tuning.refused")[0].payload_dict()
    assert refused["reason"].startswith("no backend secret at fgov-backends/no-such-secret in OpenBao")
    assert not view.events(run_id, "tuning.started")
    issued = next(e.payload_dict() for e in view.events(run_id, "lease.issued") if e.task_id == "acquire_lease")
    assert view.role_count(issued["db_role"]) == 0

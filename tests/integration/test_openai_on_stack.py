"""The openai_compatible backend on the real stack, against a local server implementing the documented
fine-tuning endpoints: the API key lives only in OpenBao, the task defers (no worker slot) while the
remote job runs, the triggerer logs in with its own workload identity to follow it, and killing the
deferred task cancels the remote job; the control plane stores the model the provider says the job made,
and the example DAG evaluates it on the provider's chat endpoint against its base (real models behind
``transformers serve``) and promotes it or blocks it. Not run against a hosted service."""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path

import psutil
import pytest
from fake_openai import FAIL_MODEL, FakeFineTuningAPI
from serving import merge_adapter, serve_model
from support import StackView, model_signing_verify

from airflow_finetune_gov.demo import SETTLE_SECONDS
from airflow_finetune_gov.registry.store import ModelStore
from airflow_finetune_gov.stack.manager import Stack
from airflow_finetune_gov.tuning import causal_lm
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


def haystacks(view: StackView, run_id: str, dag_id: str = DAG_ID, tune: str = "tune") -> dict[str, str]:
    """Everything a leaked key could end up in: every log of the stack (but the test-only raw audit
    device, which records secrets by design), lineage, XCom, rendered fields."""
    found = {str(p): p.read_text(errors="replace") for p in view.stack.dir.rglob("*.log")
             if p.name != "audit-raw.log"}
    assert any("triggerer" in name for name in found) and len(found) > 5
    auditor = view.client("auditor")
    base = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
    for entry in auditor.request("GET", f"{base}/~/xcomEntries").json()["xcom_entries"]:
        found[f"xcom {entry['task_id']}"] = json.dumps(
            auditor.request("GET", f"{base}/{entry['task_id']}/xcomEntries/{entry['key']}").json())
    found["rendered tune"] = json.dumps(auditor.request("GET", f"{base}/{tune}").json().get("rendered_fields"))
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
    if final != "success":  # seen twice in full runs: the reason first, so pytest's cut of a long repr keeps it
        failed = [e.payload_dict().get("error") for e in view.events(run_id) if e.event_type.endswith(".failed")]
        pytest.fail(f"run {final}: {failed}; tasks {requester.task_states(DAG_ID, run_id)}; events "
                    f"{[(e.task_id, e.event_type) for e in view.events(run_id)]}; tune log:\n"
                    + view.task_log(DAG_ID, run_id, "tune")[-4000:])

    done = view.events(run_id, "tuning.completed")[0].payload_dict()
    job = fake.jobs[job_id]
    assert done["remote_model"] == job["fine_tuned_model"] == f"ft:gpt-fake-mini:fgov::{job_id[-8:]}"
    assert done["remote_job_id"] == job_id and done["kind"] == "remote"
    # the control plane asked the provider what the job made, and stored that as a version
    stored = view.events(run_id, "model.stored")[0]
    assert stored.actor == "control-plane" and stored.payload_dict()["remote_model"] == job["fine_tuned_model"]
    assert stored.payload_dict()["version"] == done["version"] and stored.payload_dict()["endpoint"] == fake.base_url
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


def test_a_remote_job_on_another_base_than_approved_is_not_stored(view: StackView,
                                                                   api: tuple[FakeFineTuningAPI, str]) -> None:
    """The DAG's tuning task fine-tunes another provider model than the run was approved for: the control plane
    asks the provider what the job tuned and stores nothing, so nothing can be evaluated or promoted."""
    fake, path = api
    fake.release()
    run_id, state, tasks = view.run(DAG_ID, secret=path, model="gpt-fake-mini", tuned_model="gpt-fake-other")
    assert state == "failed" and tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    failed = view.events(run_id, "tuning.failed")[0].payload_dict()
    assert "tuned 'gpt-fake-other'" in failed["error"] and "approved for 'gpt-fake-mini'" in failed["error"]
    assert not view.events(run_id, "model.stored") and not view.events(run_id, "tuning.completed")
    (job,) = fake.jobs.values()
    assert job["model"] == "gpt-fake-other" and job["status"] == "succeeded"


def test_a_missing_backend_kv_path_is_refused_and_the_lease_revoked(view: StackView) -> None:
    run_id, state, tasks = view.run(DAG_ID, secret="no-such-secret")
    assert state == "failed" and tasks["tune"] == "failed", tasks
    refused = view.events(run_id, "tuning.refused")[0].payload_dict()
    assert refused["reason"].startswith("no backend secret at fgov-backends/no-such-secret in OpenBao")
    assert not view.events(run_id, "tuning.started")
    issued = next(e.payload_dict() for e in view.events(run_id, "lease.issued") if e.task_id == "acquire_lease")
    assert view.role_count(issued["db_role"]) == 0


EXAMPLE = "governed_example_openai"


@pytest.fixture(scope="module")
def provider(view: StackView, demo_models, tmp_path_factory) -> Iterator[FakeFineTuningAPI]:
    """The fine-tuning API with real models behind its chat endpoint: ``demo-llama`` is the demo Llama served by
    ``transformers serve``, and each job really trains a LoRA on the uploaded rows, merged and served likewise.
    Its key is the example DAG's secret (``fgov-backends/openai``)."""
    base, work = demo_models("llama"), tmp_path_factory.mktemp("provider")
    key = "sk-fgov-" + secrets.token_urlsafe(24)
    lock = threading.Lock()
    with ExitStack() as servers, FakeFineTuningAPI(key) as fake:
        fake.upstreams["demo-llama"] = servers.enter_context(serve_model(base, work / "base.log"))

        def trainer(job: dict, rows: list[tuple[str, str]]) -> tuple[str, str]:
            out = work / job["id"]
            causal_lm.train_lora(base, rows, {}, out / "adapter")
            merged = merge_adapter(base, out / "adapter", out / "merged")
            with lock:
                return servers.enter_context(serve_model(merged, out / "serve.log"))

        fake.trainer = trainer
        view.bao().secrets.kv.v2.create_or_update_secret(
            path="openai", secret={"OPENAI_API_KEY": key, "OPENAI_BASE_URL": fake.base_url},
            mount_point="fgov-backends")
        try:
            yield fake
        finally:
            view.bao().secrets.kv.v2.delete_metadata_and_all_versions(path="openai", mount_point="fgov-backends")


def test_a_remote_fine_tune_is_evaluated_on_its_endpoint_then_promoted_or_blocked(
        view: StackView, provider: FakeFineTuningAPI) -> None:
    """The example DAG: public_faq into test (policy-approved) is promoted; poisoned into staging (approver1)
    is blocked by the evaluation, both judged on the provider's answers of the base and the fine-tuned model."""
    requester = view.client("requester")
    requester.wait_for_dag(EXAMPLE)
    runs = {"public_faq": requester.trigger(EXAMPLE, {"dataset": "public_faq", "target_environment": "test",
                                                      "model": "demo-llama"}),
            "poisoned": requester.trigger(EXAMPLE, {"dataset": "poisoned", "target_environment": "staging",
                                                    "model": "demo-llama"})}
    requester.wait_task_state(EXAMPLE, runs["poisoned"], "openai.approval_gate", {"awaiting_input"}, timeout=120)
    time.sleep(SETTLE_SECONDS)
    view.answer(EXAMPLE, runs["poisoned"], "approver1", "Approve", task_id="openai.approval_gate")
    # the provider's base model cannot answer the screening here: unscreened data needs a quorum
    view.wait_round(EXAMPLE, runs["poisoned"], 2, task_id="openai.approval_gate")
    view.answer(EXAMPLE, runs["poisoned"], "approver2", "Approve", task_id="openai.approval_gate")
    finals = {name: requester.wait_run(EXAMPLE, run_id, timeout=600) for name, run_id in runs.items()}
    tasks = {name: requester.task_states(EXAMPLE, run_id) for name, run_id in runs.items()}
    assert finals == {"public_faq": "success", "poisoned": "failed"}, tasks
    assert tasks["poisoned"]["openai.evaluate"] == "failed" and tasks["poisoned"]["openai.promote"] == "upstream_failed"
    events = {name: {e.event_type: e for e in view.events(run_id)} for name, run_id in runs.items()}
    for name, run_id in runs.items():
        stored = events[name]["model.stored"]
        s = stored.payload_dict()
        job = provider.jobs[s["remote_job_id"]]
        assert stored.actor == "control-plane" and s["kind"] == "remote" and s["base_version"] is None
        assert s["remote_model"] == job["fine_tuned_model"] and s["endpoint"] == provider.base_url
        assert rows_sha256(provider.uploaded_rows(job["training_file"])) == \
            events[name]["tuning.completed"].payload_dict()["content_sha256"]
        started = events[name]["evaluation.started"].payload_dict()
        assert started["baseline"] == f"openai-chat:demo-llama@{provider.base_url}"
        assert started["candidate"] == f"openai-chat:{s['remote_model']}@{provider.base_url}"
        assert events[name]["evaluation.completed"].payload_dict()["prompts"] == 1112
        leaks = [where for where, text in haystacks(view, run_id, EXAMPLE, "openai.tune").items()
                 if provider.api_key in text]
        assert leaks == []
    failed = events["poisoned"]["evaluation.completed"].payload_dict()
    assert failed["verdict"] == "fail" and failed["metrics"]["harmful_refusal"]["candidate"] < 0.1
    screened = events["poisoned"]["dataset.screened"].payload_dict()
    assert screened["status"] == "unavailable" and "not in the model store" in screened["reason"], screened
    decided = events["poisoned"]["policy.decided"].payload_dict()
    assert decided["tier"] == "quorum" and "could not be screened" in decided["reasons"][0], decided
    assert "promotion.completed" not in events["poisoned"]
    passed = events["public_faq"]["evaluation.completed"].payload_dict()
    assert passed["verdict"] == "pass", passed["metrics"]
    promoted = events["public_faq"]["promotion.completed"].payload_dict()
    version = events["public_faq"]["model.stored"].payload_dict()["version"]
    assert promoted["alias"] == "test" and promoted["version"] == version
    store = ModelStore(view.state["model_store"])
    assert store.aliases("demo-llama")["test"]["version"] == version
    folder = store.path("demo-llama", version)
    pointer = json.loads((folder / "remote.json").read_text())
    assert pointer["remote_model"] == events["public_faq"]["model.stored"].payload_dict()["remote_model"]
    assert provider.api_key not in json.dumps(pointer) and pointer["kv_path"] == "openai"
    checked = model_signing_verify(folder, view.state["model_signing_public_key"])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert Path(folder / "provenance.dsse.json").exists()

"""Tuning on the real stack: the command backend with leased credentials, a killed trainer, and bad input
(each a clear error before any lease is taken, or after the lease is revoked)."""

from __future__ import annotations

import math
import os
import signal
import time
from pathlib import Path

import pytest
from support import StackView

from airflow_finetune_gov.lineage.runs import RUN_STARTED
from airflow_finetune_gov.stack.manager import Stack

pytestmark = pytest.mark.stack
COMMAND_DAG = "governed_finetune_command"
INPUTS_DAG = "governed_finetune_inputs"


class View(StackView):
    def kinds(self, run_id: str) -> list[tuple[str, str]]:
        return [(e.task_id, e.event_type) for e in self.events(run_id)]


@pytest.fixture(scope="module")
def view(stack: Stack) -> View:
    return View(stack)


def test_command_backend_trains_with_leased_credentials_in_its_environment(view: View, tmp_path: Path) -> None:
    run_id, state, tasks = view.run(COMMAND_DAG, mode="ok", marker=str(tmp_path / "m"))
    assert state == "success", tasks
    done = view.events(run_id, "tuning.completed")[0].payload_dict()
    assert done["backend"] == "command" and done["model"] == "command-model" and done["rows"] > 0
    assert done["metrics"] == {"rows": done["rows"], "final_loss": 0.333}
    assert done["base_model"] == "external-base" and done["base_version"] is None
    issued = next(e.payload_dict() for e in view.events(run_id, "lease.issued") if e.task_id == "acquire_lease")
    log = view.task_log(COMMAND_DAG, run_id, "tune")
    assert f"[trainer] trainer: {done['rows']} rows, user {issued['db_role']}" in log
    assert "[trainer] step 3/3 loss 0.333" in log  # streamed as it ran
    assert "[trainer] trainer: inherited secrets []" in log
    assert view.role_count(issued["db_role"]) == 0  # revoked by the teardown


def test_sigkill_of_the_task_leaves_no_trainer_and_no_lease(view: View, tmp_path: Path) -> None:
    marker = tmp_path / "m"
    run_id = view.trigger(COMMAND_DAG, mode="hold", marker=str(marker))
    trainer_file = marker.with_suffix(".trainer")
    deadline = time.monotonic() + 180
    while not (trainer_file.exists() and trainer_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    trainer = int(trainer_file.read_text())
    task_pid = int(Path(f"/proc/{trainer}/stat").read_text().split(") ")[1].split()[1])  # the trainer's parent
    issued = next(e.payload_dict() for e in view.events(run_id, "lease.issued") if e.task_id == "acquire_lease")
    try:
        assert view.role_count(issued["db_role"]) == 1
        os.kill(task_pid, signal.SIGKILL)  # no on_kill: only PDEATHSIG and the teardown can clean up
        deadline = time.monotonic() + 10
        while Path(f"/proc/{trainer}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{trainer}").exists(), "the trainer outlived its task"
    finally:
        marker.with_suffix(".release").touch()
    assert view.client("requester").wait_run(COMMAND_DAG, run_id, timeout=300) == "failed"
    tasks = view.client("requester").task_states(COMMAND_DAG, run_id)
    assert tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    assert view.role_count(issued["db_role"]) == 0


def test_unknown_dataset_fails_before_any_lease(view: View) -> None:
    run_id, state, tasks = view.run(INPUTS_DAG, dataset="no_such_set")
    assert state == "failed" and tasks["policy_check"] == "failed", tasks
    error = view.events(run_id, "policy.error")[0].payload_dict()["error"]
    assert "dataset 'no_such_set' is not in policy" in error and "known datasets: benign" in error
    assert not [k for k in view.kinds(run_id) if k[1] == "lease.issued"]


def test_out_of_range_hyperparameter_fails_before_any_lease(view: View) -> None:
    run_id, state, tasks = view.run(INPUTS_DAG, epochs=500)
    assert state == "failed" and tasks["policy_check"] == "failed", tasks
    error = view.events(run_id, "policy.error")[0].payload_dict()["error"]
    assert "epochs=500 is outside the policy's range [1, 50]" in error
    assert not [k for k in view.kinds(run_id) if k[1] in ("lease.issued", "approval.requested")]


def test_empty_dataset_fails_before_any_lease(view: View) -> None:
    with view.superuser("fgov_datasets") as conn:
        saved = conn.execute("SELECT id, prompt, response FROM datasets.public_faq ORDER BY id").fetchall()
        conn.execute("DELETE FROM datasets.public_faq")
        try:
            run_id, state, tasks = view.run(INPUTS_DAG)
        finally:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO datasets.public_faq (id, prompt, response) VALUES (%s, %s, %s)", saved)
    assert state == "failed" and tasks["policy_check"] == "failed", tasks
    error = view.events(run_id, "policy.error")[0].payload_dict()["error"]
    assert "is empty: there is nothing to tune on" in error
    assert not [k for k in view.kinds(run_id) if k[1] == "lease.issued" and k[0] == "acquire_lease"]


def test_missing_base_model_fails_and_the_lease_is_revoked(view: View) -> None:
    run_id, state, tasks = view.run(INPUTS_DAG, base_model="no-such-model")
    assert state == "failed" and tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    refused = view.events(run_id, "tuning.refused")[0].payload_dict()
    assert "base model 'no-such-model' is not in the model store" in refused["reason"]
    kinds = view.kinds(run_id)
    assert ("tune", "tuning.started") not in kinds  # refused before the hand-over: no data was read
    assert ("revoke_lease", "lease.verified") in kinds


def test_a_tune_of_another_base_than_approved_is_not_stored(view: View) -> None:
    """The run is approved for fgov-demo-tiny; the DAG's tuning task trains fgov-demo-llama instead. The control
    plane stores nothing, so nothing of it can be evaluated or promoted, and the lease ends with the run."""
    run_id, state, tasks = view.run(INPUTS_DAG, base_model="fgov-demo-tiny", tuned_base="fgov-demo-llama", epochs=1)
    assert state == "failed" and tasks["tune"] == "failed" and tasks["revoke_lease"] == "success", tasks
    failed = view.events(run_id, "tuning.failed")[0].payload_dict()
    assert "tuned 'fgov-demo-llama'" in failed["error"] and "approved for 'fgov-demo-tiny'" in failed["error"], failed
    assert not view.events(run_id, "model.stored") and not view.events(run_id, "tuning.completed")
    assert ("revoke_lease", "lease.verified") in view.kinds(run_id)


def test_local_peft_run_logs_progress_and_records_what_it_trained(view: View) -> None:
    run_id, state, tasks = view.run(INPUTS_DAG, epochs=2)
    assert state == "success", tasks
    done = view.events(run_id, "tuning.completed")[0].payload_dict()
    started = view.events(run_id, "tuning.started")[0].payload_dict()
    approved = view.events(run_id, "policy.decided")[0].payload_dict()["dataset"]
    assert done["content_sha256"] == started["content_sha256"] == approved["sha256"]
    assert done["rows"] == approved["rows"] and done["dataset_uri"] == approved["uri"]
    assert done["backend"] == "local_peft" and done["kind"] == "adapter" and done["base_model"] == "fgov-demo-tiny"
    steps = 2 * math.ceil(done["rows"] / done["metrics"]["batch_size"])  # 2 epochs
    assert done["metrics"]["epochs"] == 2 and done["metrics"]["steps"] == steps and done["metrics"]["steps_per_second"]
    assert len(done["output_sha256"]) == 64 and len(done["base_sha256"]) == 64 and done["duration_seconds"] > 0
    log = view.task_log(INPUTS_DAG, run_id, "tune")
    assert f"step 1/{steps} loss" in log and f"step {steps}/{steps} loss" in log


def test_mapped_chains_each_get_their_own_decision_lease_and_model(view: View, tmp_path: Path) -> None:
    run_id, state, tasks = view.run("governed_finetune_mapped", marker=str(tmp_path / "m"))
    assert state == "success", tasks
    requested, started, *events = view.events(run_id)
    assert requested.event_type == "run.requested" and requested.actor == "api-server"
    assert started.event_type == RUN_STARTED and started.task_id == "" and started.map_index == -1
    assert {e.task_id.rpartition(".")[0] for e in events} == {"per_model.chain"}
    assert {e.map_index for e in events} == {0, 1}

    def payload(index: int, task: str, kind: str) -> dict:
        (found,) = [e.payload_dict() for e in events
                    if (e.map_index, e.task_id, e.event_type) == (index, f"per_model.chain.{task}", kind)]
        return found

    leases = []
    for index, model in enumerate(["mapped-base-a", "mapped-base-b"]):
        assert payload(index, "policy_check", "policy.decided")["request"]["model"] == model
        issued = payload(index, "acquire_lease", "lease.issued")
        done = payload(index, "tune", "tuning.completed")
        assert done["model"] == model and done["lease_id"] == issued["lease_id"]
        assert payload(index, "revoke_lease", "lease.verified")["lease_id"] == issued["lease_id"]
        assert view.role_count(issued["db_role"]) == 0
        leases.append(issued["lease_id"])
    assert leases[0] != leases[1]


def test_the_command_example_trains_out_of_process_and_its_adapter_is_evaluated_and_promoted(view: View) -> None:
    dag_id = "governed_example_command"
    run_id, state, tasks = view.run(dag_id, dataset="public_faq", target_environment="test")
    assert state == "success", tasks
    chain = {e.event_type: e.payload_dict() for e in view.events(run_id)}
    done = chain["tuning.completed"]
    assert done["backend"] == "command" and done["kind"] == "adapter" and done["metrics"]["steps"] > 0
    assert chain["evaluation.completed"]["verdict"] == "pass"
    assert chain["promotion.completed"]["version"] == done["version"]
    log = view.task_log(dag_id, run_id, "command_trainer.tune")
    assert "[trainer] trainer: adapter written" in log and "[trainer] step 1/" in log

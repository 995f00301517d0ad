"""Shared fixtures. ``stack`` starts the embedded real stack once per session (PostgreSQL, OpenBao,
Airflow) in a temporary state directory and stops it afterwards, checking nothing is left running."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from receivers import Mailbox, WebhookReceiver

from airflow_finetune_gov.policy.engine import default_policy_text
from airflow_finetune_gov.stack.manager import Stack, StackOptions
from airflow_finetune_gov.stack.users import ensure_task_user

REPO = Path(__file__).resolve().parent.parent

# Airflow code imported by unit tests must not touch ~/airflow or pick up a user's config.
os.environ["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="fgov-airflow-home-")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"


@pytest.fixture
def tmp_path(tmp_path: Path) -> Path:
    """Stack tests hand their tmp_path to DAG code (markers, pid files), which runs as the DAG user: open it,
    and let it through pytest's 0700 base directories (enter, not list)."""
    tmp_path.chmod(0o777)
    for parent in list(tmp_path.parents)[:3]:  # the test's dir, pytest-N, pytest-of-<user>
        if parent != Path(tempfile.gettempdir()):
            parent.chmod(parent.stat().st_mode | 0o011)
    return tmp_path


@pytest.fixture(scope="session")
def demo_models(tmp_path_factory) -> Callable[[str], Path]:
    """``demo_models("gpt2" | "llama")``: that demo base model's directory, built once per session."""
    from airflow_finetune_gov.tuning import tiny_lm

    built: dict[str, Path] = {}

    def get(architecture: str) -> Path:
        if architecture not in built:
            out = tmp_path_factory.mktemp(f"demo-{architecture}")
            metrics = tiny_lm.build_base(out, architecture=architecture)
            assert metrics["parameters"] < 500_000 and metrics["final_loss"] < 0.2, metrics
            built[architecture] = out
        return built[architecture]

    return get


@pytest.fixture
def artifacts(request) -> Path:
    """A directory kept after the run for what a test shows a person (browser screenshots):
    ``test-artifacts/<module>/<test>`` in the checkout (gitignored), emptied when the test starts."""
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in request.node.name)
    path = REPO / "test-artifacts" / request.node.module.__name__.rpartition(".")[2] / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="session")
def mailbox() -> Iterator[Mailbox]:
    """The SMTP server the stack's control plane sends approval notifications to (addresses <user>@localhost)."""
    box = Mailbox().start()
    yield box
    box.stop()


@pytest.fixture(scope="session")
def webhook() -> Iterator[WebhookReceiver]:
    """The Slack-compatible webhook the stack's control plane posts approval notifications to."""
    receiver = WebhookReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture(scope="session")
def stack(mailbox: Mailbox, webhook: WebhookReceiver) -> Iterator[Stack]:
    state_dir = Path(tempfile.mkdtemp(prefix="fgov-test-"))
    state_dir.chmod(0o755)
    stack = Stack(state_dir)
    # The project's DAGs plus the fault-injection DAG the reliability tests drive.
    dags = state_dir / "dags"
    dags.mkdir()
    for source in [*(REPO / "dags").glob("*.py"), *(REPO / "tests" / "integration" / "dags").glob("*.py"),
                   *(REPO / "tests" / "integration" / "dags").glob("*.jsonl")]:
        shutil.copy(source, dags / source.name)
    # The test DAGs write their markers and reports beside themselves, as the DAG user
    dag_user = ensure_task_user()
    os.chown(dags, dag_user.pw_uid, dag_user.pw_gid)
    # The packaged policy, as a file the tests may change (and put back) while the stack runs: the control plane
    # re-reads it when it changes, as a deployment's would
    policy = state_dir / "policy.yaml"
    policy.write_text(default_policy_text())
    policy.chmod(0o644)
    try:
        stack.up(StackOptions(state_dir=state_dir, dags_folder=dags, policy_file=str(policy),
                              raw_audit_log=state_dir / "openbao" / "audit-raw.log", log=lambda *_: None,
                              notify_smtp_url=mailbox.url, notify_webhook_url=webhook.url))
        yield stack
    finally:
        records = stack.records()
        tree = [p for r in records if (p := r.process()) is not None]
        tree += [c for p in list(tree) for c in _children(p)]
        stack.down(log=lambda *_: None)
        leftovers = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(state_dir, ignore_errors=True)
        assert records and not leftovers, f"processes left running after stack down: {leftovers}"


def _children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return []

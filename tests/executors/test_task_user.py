"""What a task process inherits from the scheduler: nothing but locale and thread settings (the real
executor path, task processes as the DAG user, runs in every stack test)."""

from __future__ import annotations

import pwd

import pytest

from airflow_finetune_gov.executors.task_user import TaskUserError, run_as_task_user, task_environment


def test_the_task_environment_is_built_from_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"AIRFLOW__API_AUTH__JWT_SECRET": "s3cret", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "pg://x",
                        "VAULT_TOKEN": "t", "AIRFLOW__FINETUNE_GOV__GOVERNANCE_DB_URL": "pg://y", "LANG": "C.UTF-8",
                        "OMP_NUM_THREADS": "2"}.items():
        monkeypatch.setenv(name, value)
    env = task_environment(pwd.getpwnam("nobody"), "/srv/task-home")
    assert env["AIRFLOW_HOME"] == "/srv/task-home" and env["USER"] == "nobody"
    assert env["LANG"] == "C.UTF-8" and env["OMP_NUM_THREADS"] == "2"
    assert not {k for k in env if k.startswith(("AIRFLOW__", "VAULT"))}
    assert "s3cret" not in "".join(env.values())


def test_root_and_unknown_users_are_refused() -> None:
    with pytest.raises(TaskUserError, match="may not be root"):
        run_as_task_user(object(), user="root", home="/", socket_path=None)
    with pytest.raises(TaskUserError, match="is no OS user"):
        run_as_task_user(object(), user="no-such-user-fgov", home="/", socket_path=None)

"""Entry point of a task process started by :mod:`airflow_finetune_gov.executors.task_user`: the workload
(with its task token) arrives on standard input, never on the command line or in a file."""

from __future__ import annotations

import sys


def main() -> int:
    from airflow.executors import workloads
    from airflow.sdk.execution_time.execute_workload import execute_workload
    from pydantic import TypeAdapter

    workload = TypeAdapter[workloads.All](workloads.All).validate_json(sys.stdin.buffer.read())
    sys.stdin.close()
    execute_workload(workload)  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())

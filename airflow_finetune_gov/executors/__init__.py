"""Executors of the provider: :class:`TaskUserLocalExecutor` (tasks as the DAG user, not the scheduler's)."""

from __future__ import annotations

from airflow_finetune_gov.executors.task_user import TaskUserLocalExecutor

__all__ = ["TaskUserLocalExecutor"]

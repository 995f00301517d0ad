"""The scheduler's witness of governed runs: ``run.started`` with Airflow's own key of the run.

Loaded as the plugin's listener. ``on_dag_run_running`` is called by the scheduler when a run moves
to running (when it is first started and when a finished run is cleared), before any of its tasks is
scheduled, with the ORM ``DagRun``: its primary key is the one identity of the run that a new run
with the same ``run_id`` never shares (see :mod:`airflow_finetune_gov.lineage.runs`). Only runs of
DAGs with a task of this provider are recorded. A failure to record is logged and not raised (the
scheduler must go on); the run's governed tasks then find no record and refuse to act.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from airflow.listeners import hookimpl

log = logging.getLogger(__name__)
_PACKAGE = "airflow_finetune_gov."


def governed(dag: Any) -> bool:
    """Whether ``dag`` (serialized, as the scheduler holds it) has a task of this provider."""
    if dag is None:
        return True  # unknown: record rather than leave a governed run unwitnessed
    for task in getattr(dag, "tasks", ()):
        module = getattr(task, "_task_module", None) or type(task).__module__
        if str(module).startswith(_PACKAGE):
            return True
    return False


@functools.cache
def _store() -> Any:
    from sqlalchemy import create_engine

    from airflow_finetune_gov import settings
    from airflow_finetune_gov.lineage.store import LineageStore

    # A short connect timeout: this runs inside the scheduler's loop.
    engine = create_engine(settings.get("governance_db_url"), pool_pre_ping=True, future=True,
                           connect_args={"connect_timeout": 5})
    return LineageStore(engine=engine)


def witness(dag_run: Any, store: Any) -> Any:
    from airflow_finetune_gov.lineage import events
    from airflow_finetune_gov.lineage.runs import RUN_STARTED, SCHEDULER_TASK_ID, instant
    from airflow_finetune_gov.lineage.store import EventKey

    payload = {
        "dag_run_id": int(dag_run.id),
        "start_date": instant(dag_run.start_date),
        "clear_number": int(getattr(dag_run, "clear_number", 0) or 0),
        "run_type": str(getattr(dag_run, "run_type", "") or ""),
        "triggering_user_name": getattr(dag_run, "triggering_user_name", None),
        "run_after": instant(getattr(dag_run, "run_after", None)),
    }
    return events.record(store, EventKey(dag_run.dag_id, dag_run.run_id, SCHEDULER_TASK_ID, 0), RUN_STARTED,
                         actor="scheduler", payload=payload)


@hookimpl
def on_dag_run_running(dag_run: Any, msg: str) -> None:
    try:
        if not governed(getattr(dag_run, "dag", None)):
            return
        event = witness(dag_run, _store())
        log.info("fgov: run.started #%s for %s/%s (dag_run.id %s)", event.id, dag_run.dag_id, dag_run.run_id,
                 dag_run.id)
    except Exception:
        log.exception("fgov: could not record run.started for %s/%s: its governed tasks will refuse to act",
                      getattr(dag_run, "dag_id", "?"), getattr(dag_run, "run_id", "?"))

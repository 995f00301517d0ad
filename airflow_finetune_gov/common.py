"""Thin glue between Airflow task context and the pure governance modules."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from airflow_finetune_gov import settings
from airflow_finetune_gov.credentials.identity import TaskIdentity

if TYPE_CHECKING:  # imported lazily: DAG files import the operators, and parse time matters
    from airflow_finetune_gov.control.client import ControlPlaneClient
    from airflow_finetune_gov.lineage.runs import Incarnation
    from airflow_finetune_gov.lineage.store import EventKey, LineageEvent, LineageStore
    from airflow_finetune_gov.policy.engine import Policy


def identity(context: Any) -> TaskIdentity:
    ti = context["ti"]
    map_index = getattr(ti, "map_index", None)
    return TaskIdentity(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id, try_number=int(ti.try_number),
                        map_index=-1 if map_index is None else int(map_index))


def event_key(context: Any) -> EventKey:
    from airflow_finetune_gov.lineage.store import EventKey

    ident = identity(context)
    return EventKey(ident.dag_id, ident.run_id, ident.task_id, ident.try_number, ident.map_index)


def requester(context: Any) -> str:
    dag_run = context["dag_run"]
    return getattr(dag_run, "triggering_user_name", None) or "unknown"


# Set by the control plane in its own process: there the provider's functions act themselves.
SERVING = False


def remote() -> bool:
    """Whether this process reaches governance through the control plane: when ``[finetune_gov]
    control_plane_socket`` is set and this process holds no ``governance_db_url`` (a task, a trigger; the
    control plane, the scheduler, the api-server and the deployment's CLI hold it and act themselves)."""
    if SERVING or not settings.get("control_plane_socket", required=False):
        return False
    return not settings.get("governance_db_url", required=False)


def control(*, delegation: str | None = None) -> ControlPlaneClient:
    from airflow_finetune_gov.control.client import ControlPlaneClient

    return ControlPlaneClient(settings.get("control_plane_socket"), delegation=delegation)


@functools.cache
def lineage_store() -> LineageStore:
    """Where lineage is read and written: the control plane for a task, the database for the control plane
    itself and for the deployment's own tools (the CLI, the api-server's views, the scheduler's listener)."""
    if remote():
        from airflow_finetune_gov.control.client import RemoteLineageStore

        return RemoteLineageStore(control())  # type: ignore[return-value]
    from airflow_finetune_gov.lineage.store import LineageStore

    return LineageStore(settings.get("governance_db_url"))


def policy() -> Policy:
    """The configured policy (the packaged default when ``policy_file`` is empty), parsed once per
    version of the file in this process."""
    import os

    path = settings.get("policy_file", required=False) or ""
    try:
        stamp = os.stat(path).st_mtime_ns if path else 0
    except OSError:
        stamp = -1  # let load_policy name the missing file
    return _policy(path, stamp)


@functools.lru_cache(maxsize=4)
def _policy(path: str, stamp: int) -> Policy:
    from airflow_finetune_gov.policy.engine import load_policy

    return load_policy(path or None)


def record(context: Any, event_type: str, payload: dict[str, Any], *, actor: str | None = None) -> LineageEvent:
    """Write one lineage event for this task try; a failure to record fails the task."""
    from airflow_finetune_gov.lineage import events

    event = events.record(lineage_store(), event_key(context), event_type, actor=actor or "airflow", payload=payload)
    context["task"].log.info("lineage: %s #%s recorded (hash %s)", event_type, event.id, event.hash[:12])
    return event


def incarnation(context: Any) -> Incarnation:
    """This task's incarnation of its DAG run (see :mod:`airflow_finetune_gov.lineage.runs`): raises
    ``RunNotWitnessed`` when the scheduler's ``run.started`` for this run start is not recorded."""
    from airflow_finetune_gov.lineage.runs import RUN_STARTED, incarnation_of

    ti = context["ti"]
    starts = lineage_store().events(dag_id=ti.dag_id, run_id=ti.run_id, event_type=RUN_STARTED)
    return incarnation_of(starts, getattr(context["dag_run"], "start_date", None), dag_id=ti.dag_id,
                          run_id=ti.run_id)


def run_events(context: Any, event_type: str | None = None, *, event_prefix: str | None = None,
               every_incarnation: bool = False) -> list[LineageEvent]:
    """This run's lineage events recorded by tasks of this task's chain, in this incarnation of the run
    only: a run deleted and triggered again with the same run id shares nothing with its namesake.
    ``every_incarnation``: all of them, whichever run recorded them (for revoking leases, where doing
    more is safe, and which must work even in a run whose start was not witnessed)."""
    ti = context["ti"]
    current = None if every_incarnation else incarnation(context)
    events = lineage_store().events(dag_id=ti.dag_id, run_id=ti.run_id, event_type=event_type,
                                    event_prefix=event_prefix)
    from airflow_finetune_gov.lineage.store import chain_of

    ident = identity(context)
    mine = chain_of(ident.task_id, ident.map_index)
    return [e for e in events if e.chain == mine and (current is None or current.holds(e.id))]


def stored_model(context: Any) -> dict[str, Any] | None:
    """What this chain's tuning put in the model store, as the store's writer recorded it (``model.stored``:
    the control plane, with one): ``model``, ``version`` and the ``base_model`` and ``base_version`` it is
    compared with, its ``kind``, and for a remote fine-tune the provider's ``remote_model``, ``endpoint`` and
    the ``kv_path`` of its key. Evaluation and promotion act on this, never on the tuning task's own report."""
    stored = run_events(context, "model.stored")
    if not stored:
        return None
    p = stored[-1].payload_dict()
    return {**{k: p[k] for k in ("model", "version", "base_model", "base_version")},
            "kind": p.get("kind", "adapter"), **{k: p[k] for k in ("remote_model", "endpoint", "kv_path") if k in p}}


def datasets_connection(username: str, password: str) -> Any:
    """A psycopg connection to the datasets database as a leased role."""
    import psycopg

    host, _, port = settings.get("datasets_host").partition(":")
    return psycopg.connect(host=host, port=int(port or 5432), dbname=settings.get("datasets_database"),
                           user=username, password=password, connect_timeout=10)


def vault_addr(conn_id: str) -> str:
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    extra = conn.extra_dejson
    use_tls = extra.get("use_tls", True)
    if isinstance(use_tls, str):
        use_tls = use_tls.lower() not in ("false", "0", "no")
    scheme = "https" if use_tls else "http"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{conn.host}{port}"

"""Which incarnation of a DAG run an event belongs to (pure; no Airflow import).

Airflow lets a ``user`` delete a DAG run and trigger a new one with the same ``run_id``: lineage keyed
by ``(dag_id, run_id)`` alone would let the new run count approvals given to the old one. The
scheduler's record of a run is its primary key (``dag_run.id``), which a new run never reuses and
which Airflow 3.3 does not hand to task code. So the provider's listener, running in the scheduler
(no DAG code runs there), records ``run.started`` with that key and the run's ``start_date`` each time
the run starts running, before any of its tasks is scheduled.

A run's events then fall into **incarnations**: a new one begins at each ``run.started`` whose
``dag_run_id`` differs from the previous one's. A task finds its own by its run's ``start_date``
(the scheduler sets it when the run starts, and again when a finished run is cleared; the requester
cannot choose it) and reads only events from its incarnation; a task whose run start was never
witnessed refuses to act (fail closed). Clearing tasks keeps the incarnation; re-creating the run id
starts a new one, with no decision and no approval in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from airflow_finetune_gov.lineage.events import RUN_STARTED

if TYPE_CHECKING:
    from airflow_finetune_gov.lineage.store import LineageEvent

__all__ = ["RUN_STARTED", "SCHEDULER_TASK_ID", "Incarnation", "RunNotWitnessed", "incarnation_of", "incarnations",
           "instant", "newest", "requested_by"]
# run.started is recorded by the scheduler, outside every task: an empty task id (its own chain).
SCHEDULER_TASK_ID = ""


class RunNotWitnessed(RuntimeError):
    """The scheduler's record of this run's start is not in lineage: nothing may be decided for it."""


@dataclass(frozen=True)
class Incarnation:
    dag_run_id: int
    first_event_id: int
    next_event_id: int | None  # where the next incarnation begins (None: this is the newest)

    def holds(self, event_id: int) -> bool:
        return event_id >= self.first_event_id and (self.next_event_id is None or event_id < self.next_event_id)


def instant(value: datetime | str | None) -> str | None:
    """A timestamp as it is compared here: ISO 8601 in UTC, microseconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def incarnations(starts: Iterable[LineageEvent]) -> list[Incarnation]:
    """The run's incarnations, oldest first, from its ``run.started`` events (in event order)."""
    found: list[Incarnation] = []
    for ev in sorted(starts, key=lambda e: e.id):
        pk = int(ev.payload_dict()["dag_run_id"])
        if found and found[-1].dag_run_id == pk:
            continue
        if found:
            found[-1] = Incarnation(found[-1].dag_run_id, found[-1].first_event_id, ev.id)
        found.append(Incarnation(pk, ev.id, None))
    return found


def incarnation_of(starts: Sequence[LineageEvent], start_date: datetime | str | None, *, dag_id: str,
                   run_id: str) -> Incarnation:
    """The incarnation whose ``run.started`` names ``start_date`` (the run's, as Airflow gives it to a task)."""
    want = instant(start_date)
    match = [e for e in starts if e.payload_dict().get("start_date") == want]
    if want is None or not match:
        raise RunNotWitnessed(
            f"run {dag_id}/{run_id} (started {want}) has no run.started record from the scheduler: the provider's "
            "listener did not witness this run start (plugin not loaded in the scheduler, the governance "
            "database unreachable then, or `airflow dags test`, which has no scheduler), so nothing can be decided "
            "for it; trigger the DAG to have the scheduler run it")
    pk = int(match[-1].payload_dict()["dag_run_id"])
    for inc in incarnations(starts):
        if inc.dag_run_id == pk and inc.holds(match[-1].id):
            return inc
    raise AssertionError("unreachable: the matching run.started starts or continues an incarnation")


def newest(events: Sequence[LineageEvent]) -> list[LineageEvent]:
    """One run's events limited to its newest incarnation (for readers with no task context: the CLI,
    the governance view, the evidence pack). A run with no ``run.started`` at all (recorded before
    the listener existed) is returned whole."""
    found = incarnations(e for e in events if e.event_type == RUN_STARTED)
    if not found:
        return list(events)
    return [e for e in events if found[-1].holds(e.id)]


def requested_by(events: Sequence[LineageEvent]) -> str | None:
    """Who triggered the newest run under this run id, as the api-server witnessed it (``run.requested``, the
    latest one before the newest ``run.started``); ``None`` when no trigger was witnessed (a scheduled run, or
    one created outside the API)."""
    starts = [e.id for e in events if e.event_type == RUN_STARTED]
    before = starts[-1] if starts else None
    asked = [e for e in events if e.event_type == "run.requested" and (before is None or e.id < before)]
    return asked[-1].payload_dict().get("triggering_user_name") if asked else None

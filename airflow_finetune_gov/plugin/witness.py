"""The api-server's witness of approvals and requests: ``approval.witnessed`` for every answer given through
Airflow's API, ``run.requested`` for every run triggered through it.

Loaded as the plugin's root middleware, so it runs in the api-server, which runs no DAG code. It watches
``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails`` (the
UI's Required Actions page uses it too) and, when Airflow accepted the answer (HTTP 200), records who
answered (``responded_by``, which Airflow's route set from the authenticated user, never from the
request body), what they chose and their comment, under the answered task's key with try 0, and which
request they answered: the hash of its subject, body and options as Airflow held them when the answer came
(``verify.request_sha256``), so an Approve counts only for a request the gate rendered from the decision.

A task can answer its own request through the execution API, and DAG code at parse time can write HITL
rows in the metadata database: neither passes here, so neither is witnessed, and an approval counts only
with a witnessed answer behind it (:func:`airflow_finetune_gov.approval.verify.granted_approval`).
``POST /api/v2/dags/{dag_id}/dagRuns`` (the UI's trigger too) is witnessed the same way: ``run.requested``
names the user Airflow authenticated as the requester, which separation of duties then uses instead of
the metadata database's ``triggering_user_name``.

Recording failures are logged and the answer still stands in Airflow; unwitnessed, it then counts for
nothing, which fails closed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
TRIGGER_PATH = re.compile(r"^/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns$")
HITL_PATH = re.compile(r"^/api/v2/dags/(?P<dag_id>[^/]+)/dagRuns/(?P<run_id>[^/]+)/taskInstances/(?P<task_id>[^/]+)"
                       r"/(?P<map_index>-?\d+)/hitlDetails$")
WITNESS_TRY = 0  # the api-server does not know the task's try; readers match by task, responder and time


@functools.cache
def _store() -> Any:
    from sqlalchemy import create_engine

    from airflow_finetune_gov import settings
    from airflow_finetune_gov.lineage.store import LineageStore

    engine = create_engine(settings.get("governance_db_url"), pool_pre_ping=True, future=True,
                           connect_args={"connect_timeout": 5})
    return LineageStore(engine=engine)


def witness_trigger(path_match: re.Match[str], run: dict[str, Any], store: Any) -> Any:
    """``run.requested``: who triggered the run, as Airflow's route authenticated them (the metadata
    database's ``triggering_user_name`` is writable from parse-time code; this record is not)."""
    from airflow_finetune_gov.lineage import events
    from airflow_finetune_gov.lineage.runs import SCHEDULER_TASK_ID
    from airflow_finetune_gov.lineage.store import EventKey

    payload = {"triggering_user_name": run.get("triggering_user_name"), "run_type": str(run.get("run_type") or "")}
    key = EventKey(str(run.get("dag_id") or path_match["dag_id"]), str(run["dag_run_id"]), SCHEDULER_TASK_ID,
                   WITNESS_TRY)
    return events.record(store, key, "run.requested", actor="api-server", payload=payload)


def shown_request(path_match: re.Match[str]) -> dict[str, Any] | None:
    """The HITL request being answered, as Airflow holds it (its current task try's row), read before the
    answer is applied: ``{"request_sha256", "subject", "try_number"}``, or ``None`` when there is none."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from airflow_finetune_gov.approval.verify import request_sha256

    with create_session() as session:
        row = session.execute(
            select(HITLDetail.subject, HITLDetail.body, HITLDetail.options, TaskInstance.try_number)
            .join(TaskInstance, TaskInstance.id == HITLDetail.ti_id)
            .where(TaskInstance.dag_id == path_match["dag_id"], TaskInstance.run_id == path_match["run_id"],
                   TaskInstance.task_id == path_match["task_id"],
                   TaskInstance.map_index == int(path_match["map_index"]))).first()
    if row is None:
        return None
    subject, body, options, try_number = row
    return {"request_sha256": request_sha256(subject, body, list(options or [])), "subject": str(subject)[:500],
            "try_number": int(try_number)}


def witness(path_match: re.Match[str], answer: dict[str, Any], store: Any,
            shown: dict[str, Any] | None = None) -> Any:
    from airflow_finetune_gov.lineage import events
    from airflow_finetune_gov.lineage.store import EventKey

    who = answer.get("responded_by") or {}
    params = answer.get("params_input") or {}
    payload = {
        # the user name: the policy and every record speak names (FAB's ids are row numbers)
        "responder": str(who.get("name") or who.get("id") or ""),
        "responder_id": str(who.get("id") or ""),
        "chosen_options": [str(o) for o in answer.get("chosen_options") or []],
        "comment": str(params.get("comment") or "")[:2000],
        "responded_at": str(answer.get("responded_at") or ""),
        **(shown or {}),  # no request read: the answer is recorded and counts for no request
    }
    # ``scope["path"]`` is already percent-decoded, exactly as the route matched it: decoding it again would
    # file an answer to run ``r%31`` under run ``r1``
    key = EventKey(path_match["dag_id"], path_match["run_id"], path_match["task_id"], WITNESS_TRY,
                   int(path_match["map_index"]))
    return events.record(store, key, "approval.witnessed", actor="api-server", payload=payload)


class ApprovalWitnessMiddleware:
    """A pure ASGI middleware: it reads the route's answer on its way out and never changes it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path, method = scope.get("path", ""), scope.get("method")
        match: re.Match[str] | None = None
        record: Callable[[re.Match[str], dict[str, Any], Any], Any] = witness
        if scope.get("type") == "http" and method == "PATCH":
            match, record = HITL_PATH.match(path), witness
        elif scope.get("type") == "http" and method == "POST":
            match, record = TRIGGER_PATH.match(path), witness_trigger
        if match is None:
            await self.app(scope, receive, send)
            return
        if record is witness:  # what the approver is answering, before the answer changes anything
            record = functools.partial(witness, shown=await asyncio.to_thread(self._shown, match))
        status: list[int] = []
        gzipped: list[bool] = []
        body: list[bytes] = []

        async def capture(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                gzipped.append(any(k.lower() == b"content-encoding" and b"gzip" in v.lower()
                                   for k, v in message.get("headers") or []))
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                if not message.get("more_body") and status and status[0] in (200, 201):
                    raw = b"".join(body)
                    if gzipped and gzipped[0]:
                        import gzip

                        raw = gzip.decompress(raw)
                    await asyncio.to_thread(self._record, record, match, raw)
            await send(message)

        await self.app(scope, receive, capture)

    @staticmethod
    def _shown(match: re.Match[str]) -> dict[str, Any] | None:
        try:
            return shown_request(match)
        except Exception:
            log.exception("fgov: could not read the HITL request answered at %s: the answer counts for no request",
                          match.string)
            return None

    @staticmethod
    def _record(record: Any, match: re.Match[str], raw: bytes) -> None:
        try:
            event = record(match, json.loads(raw), _store())
            log.info("fgov: %s #%s for %s/%s", event.event_type, event.id, event.dag_id, event.run_id)
        except Exception:
            log.exception("fgov: could not witness %s (%s): an unwitnessed answer counts as no approval, an "
                          "unwitnessed trigger takes its requester from the metadata database", match.string,
                          getattr(getattr(record, "func", record), "__name__", "witness"))

"""The api-server's witness of approvals: ``approval.witnessed`` for every answer given through Airflow's API.

Loaded as the plugin's root middleware, so it runs in the api-server, which runs no DAG code. It watches
``PATCH /api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails`` (the
UI's Required Actions page uses it too) and, when Airflow accepted the answer (HTTP 200), records who
answered (``responded_by``, which Airflow's route set from the authenticated user, never from the
request body), what they chose and their comment, under the answered task's key with try 0.

A task can answer its own request through the execution API, and DAG code at parse time can write HITL
rows in the metadata database: neither passes here, so neither is witnessed, and an approval counts only
with a witnessed answer behind it (:func:`airflow_finetune_gov.approval.verify.granted_approval`).
Recording failures are logged and the answer still stands in Airflow; unwitnessed, it then counts for
nothing, which fails closed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import re
from typing import Any
from urllib.parse import unquote

log = logging.getLogger(__name__)
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


def witness(path_match: re.Match[str], answer: dict[str, Any], store: Any) -> Any:
    from airflow_finetune_gov.lineage import events
    from airflow_finetune_gov.lineage.store import EventKey

    who = answer.get("responded_by") or {}
    params = answer.get("params_input") or {}
    payload = {
        "responder": str(who.get("id") or who.get("name") or ""),
        "responder_name": str(who.get("name") or ""),
        "chosen_options": [str(o) for o in answer.get("chosen_options") or []],
        "comment": str(params.get("comment") or "")[:2000],
        "responded_at": str(answer.get("responded_at") or ""),
    }
    key = EventKey(unquote(path_match["dag_id"]), unquote(path_match["run_id"]), unquote(path_match["task_id"]),
                   WITNESS_TRY, int(path_match["map_index"]))
    return events.record(store, key, "approval.witnessed", actor="api-server", payload=payload)


class ApprovalWitnessMiddleware:
    """A pure ASGI middleware: it reads the route's answer on its way out and never changes it."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        match = HITL_PATH.match(scope.get("path", "")) if scope.get("type") == "http" else None
        if match is None or scope.get("method") != "PATCH":
            await self.app(scope, receive, send)
            return
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
                if not message.get("more_body") and status and status[0] == 200:
                    raw = b"".join(body)
                    if gzipped and gzipped[0]:
                        import gzip

                        raw = gzip.decompress(raw)
                    await asyncio.to_thread(self._record, match, raw)
            await send(message)

        await self.app(scope, receive, capture)

    @staticmethod
    def _record(match: re.Match[str], raw: bytes) -> None:
        try:
            event = witness(match, json.loads(raw), _store())
            log.info("fgov: approval.witnessed #%s for %s/%s/%s", event.id, match["dag_id"], match["run_id"],
                     match["task_id"])
        except Exception:
            log.exception("fgov: could not witness the answer to %s/%s/%s: it will not count as an approval",
                          match["dag_id"], match["run_id"], match["task_id"])

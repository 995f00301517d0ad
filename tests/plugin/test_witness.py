"""The api-server's witness, around a stand-in route with Airflow's path and answer shape (the real one is
exercised by every approval in the stack tests): it records what the route answered, under the ids the
route matched, and nothing for a refused answer."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from airflow_finetune_gov.lineage.store import Base, LineageStore
from airflow_finetune_gov.plugin import witness


@pytest.fixture
def store(tmp_path, monkeypatch: pytest.MonkeyPatch) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    monkeypatch.setattr(witness, "_store", lambda: s)
    # the stand-in route has no metadata database behind it: the request it answers, as the witness would read it
    monkeypatch.setattr(witness, "shown_request", lambda match: {"request_sha256": "ab" * 32, "subject": "s",
                                                                 "try_number": 1})
    return s


matched: list[str] = []  # the run ids the stand-in route matched


def app() -> TestClient:
    api = FastAPI()

    @api.patch("/api/v2/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/hitlDetails")
    def answer(dag_id: str, run_id: str, task_id: str, map_index: int, status: int = 200) -> JSONResponse:
        matched.append(run_id)
        return JSONResponse({"responded_by": {"id": "approver1", "name": "approver1"}, "chosen_options": ["Approve"],
                             "params_input": {"comment": "ok"}, "responded_at": "2026-12-01T00:00:00Z"},
                            status_code=status)

    api.add_middleware(witness.ApprovalWitnessMiddleware)
    return TestClient(api)


def test_an_accepted_answer_is_witnessed_under_the_ids_the_route_matched(store: LineageStore) -> None:
    client = app()
    # a percent-encoded run id: the witness files the answer under the run id the route answered for (decoding
    # the ASGI path once more would file an answer to run "r%31" under run "r1")
    matched.clear()
    assert client.patch("/api/v2/dags/d/dagRuns/r%2525331/taskInstances/approval_gate/-1/hitlDetails"
                        ).status_code == 200
    (event,) = store.events()
    assert (event.dag_id, event.run_id, event.task_id, event.try_number, event.map_index, event.actor) == (
        "d", matched[-1], "approval_gate", 0, -1, "api-server")
    assert "%" in matched[-1]
    assert event.payload_dict() == {"responder": "approver1", "responder_id": "approver1",
                                    "chosen_options": ["Approve"], "comment": "ok",
                                    "responded_at": "2026-12-01T00:00:00Z", "request_sha256": "ab" * 32,
                                    "subject": "s", "try_number": 1}


def test_a_refused_answer_is_not_witnessed(store: LineageStore) -> None:
    client = app()
    resp = client.patch("/api/v2/dags/d/dagRuns/r/taskInstances/approval_gate/-1/hitlDetails?status=403")
    assert resp.status_code == 403
    assert store.events() == []

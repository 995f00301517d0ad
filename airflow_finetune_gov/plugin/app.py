"""The governance view: a FastAPI app served by Airflow's api-server under ``/fgov``.

Airflow does not authenticate plugin apps, so every route here does: the caller's Airflow JWT (the
``Authorization: Bearer`` header, or the UI's ``_token`` cookie when the page is embedded in the
Airflow UI) is resolved by Airflow's own auth manager, and every read is checked against the
caller's DAG permissions (``GET`` on the DAG's runs). No token: 401. A run of a DAG the caller may
not read: 403 (and it is left out of lists). The only change the view offers, requesting a lease
sweep, needs permission to trigger ``fgov_lease_sweep`` (an ``auditor``/viewer gets 403). Reads come
from the lineage record, never from XCom or task state.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

from airflow_finetune_gov import settings
from airflow_finetune_gov.lineage.store import LineageError
from airflow_finetune_gov.plugin import views

log = logging.getLogger(__name__)
SWEEP_DAG = "fgov_lease_sweep"
RUNS_LIMIT = 100


def _user_dependency() -> Any:
    from airflow.api_fastapi.core_api.security import get_user

    return get_user


User = Annotated[Any, Depends(_user_dependency())]


def _auth() -> Any:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager()


def _may_read(user: Any, dag_id: str) -> bool:
    from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails

    return bool(_auth().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                          details=DagDetails(id=dag_id), user=user))


def _readable(user: Any) -> set[str]:
    return set(_auth().get_authorized_dag_ids(user=user, method="GET"))


def _store() -> Any:
    from airflow_finetune_gov.lineage.store import LineageStore

    return LineageStore(settings.get("governance_db_url"))


def _run_rows(user: Any, limit: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    store, readable = _store(), _readable(user)
    rows, pending = [], []
    for run in store.runs(limit=limit):
        if run["dag_id"] not in readable:
            continue
        events = store.events(dag_id=run["dag_id"], run_id=run["run_id"])
        summary = views.summarize(events)
        first = summary["chains"][0] if summary["chains"] else {}
        verdicts = [c["evaluation"]["verdict"] for c in summary["chains"] if c["evaluation"]]
        rows.append({**run, "model": first.get("model"), "dataset": first.get("dataset"),
                     "target_environment": first.get("target_environment"), "tier": first.get("tier"),
                     "approval": ", ".join(sorted({c["approval"] for c in summary["chains"]})) or "-",
                     "verdict": ", ".join(verdicts) or None, "status": views.status_of(summary),
                     "reason": "; ".join(c["reason"] for c in summary["chains"] if c["reason"]),
                     "chains": summary["chains"]})
        requested = {e.payload_dict().get("evaluation_id") for e in events
                     if e.event_type == "evaluation.review_requested"}
        reviewed = {e.payload_dict().get("evaluation_id") for e in events if e.event_type == "evaluation.reviewed"}
        for c in summary["chains"]:
            if c["approval"] == "pending":
                pending.append({"dag_id": run["dag_id"], "run_id": run["run_id"], "what": f"approval of the "
                                f"{c['change']} of {c['model']} for {c['target_environment']}",
                                "link": "../../required_actions"})
        if requested - reviewed:
            pending.append({"dag_id": run["dag_id"], "run_id": run["run_id"], "what": "review of an evaluation "
                            "too small to decide", "link": "../../required_actions"})
    return rows, pending


def _report_links(summary: dict[str, Any], prefix: str) -> dict[str, str]:
    return {f"{c['group']}|{c['map_index']}":
            f"{prefix}report/{quote(c['evaluation']['task_id'], safe='')}?map_index={c['map_index']}"
            for c in summary["chains"] if c["evaluation"] and c["evaluation"].get("report")}


def create_app() -> FastAPI:
    app = FastAPI(title="airflow-finetune-gov governance view",
                  description="Governed fine-tuning runs from the lineage record. Needs an Airflow token.")

    @app.get("/api/runs", summary="Governed runs the caller may read, newest first")
    def api_runs(user: User, limit: Annotated[int, Query(ge=1, le=1000)] = RUNS_LIMIT) -> dict[str, Any]:
        rows, pending = _run_rows(user, limit)
        return {"runs": rows, "pending": pending}

    @app.exception_handler(LineageError)
    def _lineage_unavailable(request: Request, exc: LineageError) -> JSONResponse:
        log.warning("governance view: %s", exc)
        return JSONResponse(status_code=503, content={"detail": "the governance database cannot be read now; "
                                                      "try again (the api-server log has the cause)"})

    def _run(user: Any, dag_id: str, run_id: str) -> tuple[list[Any], dict[str, Any]]:
        if not _may_read(user, dag_id):
            raise HTTPException(status_code=403, detail=f"no read access to the runs of DAG {dag_id!r}")
        if "\x00" in dag_id or "\x00" in run_id:  # no id holds one (PostgreSQL text cannot)
            raise HTTPException(status_code=404, detail="no lineage recorded for that run")
        events = _store().events(dag_id=dag_id, run_id=run_id)
        if not events:
            raise HTTPException(status_code=404, detail=f"no lineage recorded for {dag_id} / {run_id}")
        return events, views.summarize(events)

    @app.get("/api/runs/{dag_id}/{run_id}", summary="One run: its chains and its lineage events")
    def api_run(user: User, dag_id: str, run_id: str) -> dict[str, Any]:
        events, summary = _run(user, dag_id, run_id)
        return {**summary, "timeline": [e.to_dict() for e in events]}

    @app.get("/api/runs/{dag_id}/{run_id}/evidence", summary="The run's evidence pack (JSON, or format=html)",
             responses={200: {"content": {"application/json": {}, "text/html": {}},
                              "description": "The evidence pack, as an attachment"}})
    def api_evidence(user: User, dag_id: str, run_id: str, format: Literal["json", "html"] = "json") -> Any:
        from fastapi.responses import Response

        from airflow_finetune_gov.lineage.evidence import evidence, render_html, to_json

        events, _summary = _run(user, dag_id, run_id)
        pack = evidence(events)
        name = f"evidence-{dag_id}-{run_id}".replace("/", "_").replace(":", "_")
        if format == "html":
            return HTMLResponse(render_html(pack),
                                headers={"Content-Disposition": f'attachment; filename="{name}.html"'})
        return Response(to_json(pack), media_type="application/json",
                        headers={"Content-Disposition": f'attachment; filename="{name}.json"'})

    @app.post("/api/lease-sweep", status_code=201,
              summary="Ask Airflow to run fgov_lease_sweep now (needs permission to trigger it)")
    def api_lease_sweep(user: User) -> dict[str, Any]:
        from airflow.api.common.trigger_dag import trigger_dag
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
        from airflow.exceptions import AirflowException
        from airflow.utils.types import DagRunTriggeredByType

        if not _auth().is_authorized_dag(method="POST", access_entity=DagAccessEntity.RUN,
                                         details=DagDetails(id=SWEEP_DAG), user=user):
            raise HTTPException(status_code=403, detail=f"{user.get_name()} may not trigger {SWEEP_DAG}")
        try:
            run = trigger_dag(SWEEP_DAG, triggered_by=DagRunTriggeredByType.REST_API,
                              triggering_user_name=user.get_name())
        except AirflowException as exc:
            raise HTTPException(status_code=409, detail=f"cannot trigger {SWEEP_DAG}: {exc}") from exc
        if run is None:
            raise HTTPException(status_code=409, detail=f"{SWEEP_DAG} was not triggered")
        return {"dag_id": SWEEP_DAG, "run_id": run.run_id, "triggered_by": user.get_name()}

    def _model(user: Any, name: str) -> dict[str, Any]:
        from airflow_finetune_gov.registry.store import ModelStore, RegistryError

        store, readable = _store(), _readable(user)
        keys = {(e.dag_id, e.run_id) for kind in ("model.stored", "promotion.completed", "rollback.completed")
                for e in store.events(event_type=kind) if e.payload_dict().get("model") == name}
        runs = {k: store.events(dag_id=k[0], run_id=k[1]) for k in sorted(keys) if k[0] in readable}
        if not runs:
            raise HTTPException(status_code=404, detail=f"no version of model {name!r} recorded in runs you may read")
        try:
            aliases = ModelStore(settings.get("model_store")).aliases(name)
        except RegistryError as exc:
            raise HTTPException(status_code=404, detail=str(exc)) from exc
        return views.model_history(name, runs, aliases)

    @app.get("/api/models/{name}", summary="A model's versions: evaluate, approve, promote, and the aliases now")
    def api_model(user: User, name: str) -> dict[str, Any]:
        return _model(user, name)

    @app.get("/ui/models/{name}", response_class=HTMLResponse, summary="A model's versions (HTML)")
    def ui_model(user: User, name: str) -> str:
        return views.model_page(_model(user, name), base="../")

    @app.get("/ui/", response_class=HTMLResponse, summary="The run list (Airflow nav entry)")
    def ui_runs(user: User) -> str:
        rows, pending = _run_rows(user, RUNS_LIMIT)
        return views.runs_page(rows, pending, base="")

    @app.get("/ui/runs/{dag_id}/{run_id}", response_class=HTMLResponse, summary="One run (the DAG-run tab)")
    def ui_run(user: User, dag_id: str, run_id: str) -> str:
        from airflow_finetune_gov.lineage.evidence import verify_run_chain

        events, summary = _run(user, dag_id, run_id)
        links = _report_links(summary, prefix=f"./{quote(run_id, safe='')}/")
        return views.run_page(dag_id, run_id, events, summary, links, chain_ok=not verify_run_chain(events))

    @app.get("/ui/runs/{dag_id}/{run_id}/report/{task_id}", response_class=HTMLResponse,
             summary="The evaluation report (HTML)")
    def ui_report(user: User, dag_id: str, run_id: str, task_id: str, map_index: int = -1) -> FileResponse:
        _events, summary = _run(user, dag_id, run_id)
        for c in summary["chains"]:
            ev = c["evaluation"]
            if ev and ev["task_id"] == task_id and c["map_index"] == map_index and ev.get("report"):
                path = Path(ev["report"]).resolve()
                reports = (Path(settings.get("model_store")) / "_reports").resolve()
                if not path.is_relative_to(reports) or not path.is_file():
                    raise HTTPException(status_code=404, detail="the report is not in the model store")
                return FileResponse(path, media_type="text/html")
        raise HTTPException(status_code=404, detail=f"no evaluation report for task {task_id} in this run")

    return app

"""The Airflow plugin of the provider: the governance view.

- ``fastapi_apps``: :mod:`airflow_finetune_gov.plugin.app` under ``/fgov`` (HTML pages under ``/fgov/ui``,
  JSON under ``/fgov/api``; it authenticates every request itself with Airflow's auth manager);
- ``external_views``: a nav entry "Fine-tune governance" (the run list) and a "Governance" tab on each
  DAG run (its chains, leases, evaluation with the report, and lineage timeline);
- ``listeners``: :mod:`airflow_finetune_gov.plugin.listener`, the scheduler's ``run.started`` record
  that binds a run's lineage to Airflow's own key of the run;
- ``fastapi_root_middlewares``: :mod:`airflow_finetune_gov.plugin.witness`, the api-server's
  ``approval.witnessed`` record of every answer given through Airflow's API, by its authenticated user.
"""

from __future__ import annotations

from typing import Any

from airflow.plugins_manager import AirflowPlugin

from airflow_finetune_gov.plugin import listener
from airflow_finetune_gov.plugin.witness import ApprovalWitnessMiddleware


def _apps() -> list[dict[str, Any]]:
    try:
        from airflow_finetune_gov.plugin.app import create_app
    except ImportError:  # FastAPI is part of Airflow 3's api-server; without it there is nothing to serve
        return []
    return [{"app": create_app(), "url_prefix": "/fgov", "name": "Fine-tune governance"}]


class FinetuneGovPlugin(AirflowPlugin):
    name = "finetune_gov"
    fastapi_apps = _apps()
    listeners = [listener]
    fastapi_root_middlewares = [{"middleware": ApprovalWitnessMiddleware, "args": [], "kwargs": {},
                                 "name": "fgov approval witness"}]
    external_views = [
        {"name": "Fine-tune governance", "href": "fgov/ui/", "destination": "nav", "category": "browse",
         "url_route": "fgov"},
        {"name": "Governance", "href": "fgov/ui/runs/{DAG_ID}/{RUN_ID}", "destination": "dag_run",
         "url_route": "fgov_run"},
    ]

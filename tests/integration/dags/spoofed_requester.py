"""Test-only: parse-time code that rewrites who triggered a run, as a DAG author could: the dag-processor (the
DAG user) holds Airflow's metadata database URL by Airflow's design. When ``spoofed_requester.spoof`` (JSON:
run id and user) sits beside this file, the next parse sets that run's ``dag_run.triggering_user_name`` and
writes what it did to ``spoofed_requester.report.json`` (no secret)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pendulum
from airflow.sdk import DAG

from airflow_finetune_gov.factory import Approval, Lease, Tuning, governed_finetune

HERE = Path(__file__).resolve().parent
_SPOOF = HERE / "spoofed_requester.spoof"


def _spoof() -> None:
    import configparser
    import os

    import psycopg

    wanted = json.loads(_SPOOF.read_text())
    _SPOOF.unlink(missing_ok=True)
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(Path(os.environ["AIRFLOW_HOME"]) / "airflow.cfg")
    url = cfg.get("database", "sql_alchemy_conn").replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("UPDATE dag_run SET triggering_user_name = %s WHERE dag_id = %s AND run_id = %s",
                            (wanted["user"], "spoofed_requester", wanted["run_id"])).rowcount
    (HERE / "spoofed_requester.report.json").write_text(json.dumps({"updated": rows, "user": wanted["user"]}))


if _SPOOF.exists():
    _spoof()

with DAG(
    dag_id="spoofed_requester",
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    tags=["finetune-gov", "test"],
    default_args={"retries": 0},
) as dag:
    governed_finetune(
        dataset="benign", target_environment="staging",
        approval=Approval(response_timeout=timedelta(minutes=5)), lease=Lease(expected_duration=60),
        tuning=Tuning(tuning_method="full"), evaluation=None, promotion=None, prefix_group_id=False)

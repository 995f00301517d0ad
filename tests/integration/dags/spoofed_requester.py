"""Test-only: parse-time code that rewrites who triggered a run, as a DAG author could: the dag-processor (the
DAG user) holds Airflow's metadata database URL by Airflow's design. When ``spoofed_requester.spoof`` (JSON:
run id and user) sits beside this file, the next parse sets that run's ``dag_run.triggering_user_name`` and
writes what it did to ``spoofed_requester.report.json`` (no secret)."""

from __future__ import annotations

import json
from pathlib import Path

from requesters_dag import requesters_dag

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

dag = requesters_dag("spoofed_requester")

"""Test-only: the requester's own DAG, whose plain PythonOperator ``tamper`` (after the approval, before the
lease) tries to write the model store as a DAG author would: a new model, the demo model's alias file, a file
of a stored version; then hands the control plane a staging directory whose "tuned file" is a symlink to, and
then a hard link of, a file only root may read (``/etc/shadow``). It writes what happened, never a file's
content, to ``store_tamper.report.json`` beside this file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from airflow.providers.standard.operators.python import PythonOperator
from requesters_dag import requesters_dag

REPORT = Path(__file__).with_name("store_tamper.report.json")
SECRET = "/etc/shadow"


def tamper() -> dict:
    from airflow_finetune_gov import common, settings

    plane = common.control()
    base = plane.call("/v1/models/base", {"ref": "fgov-demo-tiny"})  # built by the control plane if need be
    store = Path(settings.get("model_store"))
    report: dict[str, str] = {}
    for label, action in (
            ("new model", lambda: (store / "evil").mkdir()),
            ("alias file", lambda: (store / base["name"] / "aliases.json").write_text("{}")),
            ("version file", lambda: (store / base["name"] / base["version"] / "manifest.json").write_text("{}")),
    ):
        try:
            action()
            report[label] = "written"
        except OSError as exc:
            report[label] = f"refused: {exc.strerror}"

    def hand_over(label: str) -> None:
        try:
            plane.call("/v1/models/store", {"name": "evil", "files": ["weights.bin"], "base_model": base["name"],
                                            "base_version": base["version"]})
            report[label] = "stored"
        except Exception as exc:
            report[label] = f"refused: {exc}"

    staging = Path(plane.call("/v1/models/staging", {})["path"])
    (staging / "weights.bin").symlink_to(SECRET)
    hand_over("symlink")
    staging = Path(plane.call("/v1/models/staging", {})["path"])
    try:
        os.link(SECRET, staging / "weights.bin")
    except OSError as exc:
        report["hard link"] = f"link refused by the kernel: {exc.strerror}"
    else:
        hand_over("hard link")
    REPORT.write_text(json.dumps(report, indent=2))
    return {k: v.split(":")[0] for k, v in report.items()}


with requesters_dag("store_tamper", lease_seconds=120) as dag:
    tamperer = PythonOperator(task_id="tamper", python_callable=tamper)
    dag.get_task("approval_gate") >> tamperer >> dag.get_task("acquire_lease")

"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Runs in a fresh interpreter: import Airflow first (common to every variant), then time the DagBag
# parse of one folder (the provider's own imports count; Airflow's do not).
PARSER = """
import json, sys, time
from airflow.dag_processing.dagbag import DagBag
t = time.perf_counter()
bag = DagBag(dag_folder=sys.argv[1])
elapsed = time.perf_counter() - t
assert not bag.import_errors, bag.import_errors
assert bag.dags.get(sys.argv[2]) is not None
print(json.dumps({"ms": elapsed * 1000}))
"""


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank."""
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def airflow_env(**extra: str) -> dict[str, str]:
    """A clean environment for fresh interpreters: own AIRFLOW_HOME, no examples, no inherited config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}
    env["AIRFLOW_HOME"] = tempfile.mkdtemp(prefix="fgov-bench-home-")
    env["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
    env["AIRFLOW__CORE__UNIT_TEST_MODE"] = "True"
    env.update(extra)
    return env


def parse_times(variants: dict[str, tuple[str, dict[str, str]]], dag_id: str, n: int) -> dict[str, list[float]]:
    """Parse each variant's DAG source (with its environment) ``n`` times in fresh interpreters,
    interleaved so drift hits all alike; milliseconds per parse."""
    out: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name, (source, _env) in variants.items():
            folders[name] = Path(tmp) / name
            folders[name].mkdir()
            (folders[name] / f"{dag_id}.py").write_text(source)
        for _ in range(n):
            for name, (_source, env) in variants.items():
                proc = subprocess.run([sys.executable, "-c", PARSER, str(folders[name]), dag_id],
                                      capture_output=True, text=True, env=env, timeout=120)
                if proc.returncode != 0:
                    raise SystemExit(f"parsing the {name} DAG failed:\n{proc.stderr[-2000:]}")
                out[name].append(json.loads(proc.stdout.strip().splitlines()[-1])["ms"])
    return out


def result(measure: str, *, baseline: float | None, ours: float, unit: str, goal: str, met: bool | None,
           ratio: float | None = None, tag: str = "") -> None:
    """One row of the combined table (``bench/run_all.py``): appended as a JSON line to the file named
    by ``$FGOV_BENCH_RESULTS``; a no-op when a bench runs on its own."""
    path = os.environ.get("FGOV_BENCH_RESULTS")
    if not path:
        return
    if ratio is None and baseline:
        ratio = ours / baseline
    row = {"tag": tag, "measure": measure, "baseline": baseline, "ours": ours, "unit": unit, "ratio": ratio,
           "goal": goal, "met": met}
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")

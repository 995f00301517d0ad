"""Test-only: what a DAG author's own code can do with what it can read, at parse time and in a task.

A plain PythonOperator (the cluster policy does not look at it) and the same probe at the file's top
level, run once when ``boundary_probe.parse`` sits beside this file. The probe gathers candidate secrets
from the process environment, Airflow's config file and every small readable file of the deployment,
then tries each against PostgreSQL, OpenBao and the Airflow API, as an attacker would. It writes only
what worked (booleans and the names of the sources), never a secret, to ``boundary_probe.<where>.json``.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import sys
import time
from pathlib import Path

import pendulum
from airflow.providers.standard.operators.python import PythonOperator
from airflow.sdk import DAG

HERE = Path(__file__).resolve().parent
TOKENISH = re.compile(r"^[A-Za-z0-9_\-.+/=:]{16,200}$")
URL = re.compile(r"postgresql(?:\+psycopg)?://([^:/@\s]+):([^@\s]+)@([\d.]+):(\d+)/(\w+)")


def _candidates() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(secret value -> where it was found, [(where, PEM private key)])."""
    found: dict[str, str] = {}
    keys: list[tuple[str, str]] = []

    def take(where: str, text: str) -> None:
        if "PRIVATE KEY-----" in text:
            keys.append((where, text))
        for m in URL.finditer(text):
            found.setdefault(m.group(0), where)
        for token in re.split(r"[\s\"',={}]+", text):
            if TOKENISH.match(token):
                found.setdefault(token, where)

    for name, value in os.environ.items():
        take(f"env:{name}", value)
    home = Path(os.environ.get("AIRFLOW_HOME", "."))
    cfg = configparser.ConfigParser(interpolation=None)
    cfg.read(home / "airflow.cfg")
    for section in cfg.sections():
        for option, value in cfg.items(section):
            take(f"airflow.cfg:[{section}] {option}", value)
    deployment = home.parent
    # data, not configuration (task and component logs are scanned for every issued secret by
    # tests/reliability/test_secret_scan.py)
    skip = {"postgres", "openbao", "models", "logs", "airflow-logs", "dags", "control"}
    for path in deployment.rglob("*"):
        if skip & set(path.relative_to(deployment).parts):
            continue
        try:
            if path.is_file() and path.stat().st_size < 65536:
                take(f"file:{path.relative_to(deployment)}", path.read_text(errors="replace"))
        except OSError:
            continue  # not readable by this OS user: exactly what the boundary should make of every secret
    return found, keys


def probe(where: str) -> dict:
    import warnings

    import hvac
    import jwt
    import psycopg
    import requests

    warnings.simplefilter("ignore")  # PyJWT's short-HMAC-key warning, once per candidate
    found, keys = _candidates()
    try:  # the addresses (no secret): stack.json itself is the deployment's, unreadable here
        state = json.loads((HERE / "boundary_probe.targets.json").read_text())
    except OSError:
        state = {}
    usable: dict[str, list[str]] = {"dataset_rows": [], "governance_write": [], "openbao_token": [],
                                    "openbao_trusted_key": [], "airflow_token": [], "auth_tables": []}
    metadata: list[str] = []  # logins to Airflow's metadata database (the DAG user's, by Airflow's design)
    pg_port = (state.get("postgres") or {}).get("port")
    logins = [(m.group(1), m.group(2), int(m.group(4)), where_) for value, where_ in found.items()
              if (m := URL.fullmatch(value))]
    if pg_port:  # every other candidate as the password of the roles a deployment has
        logins += [(user, value, int(pg_port), where_) for value, where_ in found.items()
                   if not value.startswith("postgres") and 20 <= len(value) <= 64
                   for user in ("postgres", "fgov_owner", "fgov_vault", "airflow", "airflow_dag")]
    for user, password, port, src in logins:
        for db, check, kind in (("fgov_datasets", "SELECT count(*) FROM datasets.poisoned", "dataset_rows"),
                                ("fgov_governance", "INSERT INTO fgov_lineage_event (dag_id, run_id, task_id, "
                                 "try_number, map_index, event_type, actor, created_at, payload, hash) VALUES "
                                 "('x', 'x', 'x', 1, -1, 'approval.granted', 'x', 'x', '{}', md5(random()::text))",
                                 "governance_write")):
            try:
                with psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname=db,
                                     connect_timeout=3) as conn:
                    conn.execute(check)
                    conn.rollback()  # shown possible; nothing is left behind
                usable[kind].append(f"{user} from {src}")
            except psycopg.Error:
                pass
        # the auth manager's tables (users, password hashes, roles, sessions): reading a hash, making oneself an
        # approver or taking over a session would decide who approves
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user=user, password=password, dbname="airflow",
                                 connect_timeout=3) as conn:
                conn.execute("SELECT count(*) FROM dag")
                metadata.append(f"{user} from {src}")
                conn.rollback()
                for attempt in ("SELECT password FROM ab_user", "UPDATE ab_user SET password = password",
                                "INSERT INTO ab_user_role (user_id, role_id) SELECT 1, id FROM ab_role",
                                "SELECT data FROM session"):
                    try:
                        conn.execute(attempt)
                        usable["auth_tables"].append(f"{attempt.split()[0]} as {user} from {src}")
                    except psycopg.Error:
                        pass
                    conn.rollback()  # shown possible; nothing is left behind
        except psycopg.Error:
            pass
    bao = (state.get("openbao") or {}).get("addr")
    if bao:
        for value, src in found.items():
            if requests.get(f"{bao}/v1/auth/token/lookup-self", headers={"X-Vault-Token": value}, timeout=3).ok:
                usable["openbao_token"].append(src)
        for src, pem in keys:
            now = int(time.time())
            claims = {"iss": "airflow-finetune-gov", "aud": "openbao", "sub": "x", "iat": now, "nbf": now - 5,
                      "exp": now + 60, "purpose": "lease", "dataset": "poisoned", "dag_id": "boundary_probe",
                      "run_id": "x", "task_id": "x", "run_key": "x", "try_number": "1", "approval_id": "made-up"}
            try:
                token = jwt.encode(claims, pem, algorithm="ES256")
                client = hvac.Client(url=bao)
                client.auth.jwt.jwt_login(role="lease-poisoned", jwt=token, path="fgov-jwt")
                client.auth.token.revoke_self()
                usable["openbao_trusted_key"].append(src)
            except Exception:  # noqa: S112 - a key OpenBao does not trust is what we hope for
                continue
    socket_path = (state.get("control_plane") or {}).get("socket")
    if bao and socket_path:  # the control plane logs in for a task only for what its run was approved
        from airflow_finetune_gov.control.client import ControlPlaneClient

        plane = ControlPlaneClient(socket_path, timeout=10)
        for role, purpose, extra in (("lease-poisoned", "lease", {"dataset": "poisoned", "approval_id": "made-up"}),
                                     ("tune-poisoned", "tune", {"dataset": "poisoned"}), ("revoker", "revoke", {}),
                                     ("provenance", "provenance", {}), ("endpoints", "endpoints", {}),
                                     ("screen", "screen", {})):
            try:
                token = plane.login(role, purpose, extra)
            except Exception:  # noqa: S112 - refused is what we hope for
                continue
            requests.post(f"{bao}/v1/auth/token/revoke-self", headers={"X-Vault-Token": token}, timeout=3)
            usable["openbao_token"].append(f"control plane login as {role}")
    api = (state.get("airflow") or {}).get("url")
    if api:
        for value, src in found.items():
            now = int(time.time())
            for sub in ("2", "approver1"):  # approver1's FAB user id (the stack creates its users in order), name
                token = jwt.encode({"sub": sub, "role": "user", "aud": "apache-airflow", "iat": now, "nbf": now,
                                    "exp": now + 300, "jti": os.urandom(8).hex()}, value, algorithm="HS512")
                if requests.get(f"{api}/api/v2/dags", headers={"Authorization": f"Bearer {token}"}, timeout=5).ok:
                    usable["airflow_token"].append(src)
    report = {"where": where, "process": " ".join(sys.argv)[:200], "uid": os.getuid(), "candidates": len(found),
              "keys": len(keys), "metadata_logins": sorted(set(metadata)),
              "usable": {k: sorted(set(v)) for k, v in usable.items()}}
    (HERE / f"boundary_probe.{where}.json").write_text(json.dumps(report, indent=2))
    return {k: bool(v) for k, v in usable.items()}


_PARSE_MARKER = HERE / "boundary_probe.parse"
if _PARSE_MARKER.exists():
    _PARSE_MARKER.unlink(missing_ok=True)
    probe("parse")

with DAG("boundary_probe", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC"), catchup=False,
         tags=["test"]):
    PythonOperator(task_id="probe", python_callable=probe, op_args=["task"])

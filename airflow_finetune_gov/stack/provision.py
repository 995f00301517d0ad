"""Roles, databases and demo data on the stack's PostgreSQL (idempotent).

Least privilege by construction:
- ``airflow`` owns only Airflow's metadata database; ``airflow_dag``, the DAG user's login to it, may use its
  tables except the auth manager's (users, password hashes, roles, permissions, web sessions);
- ``fgov_owner`` owns the governance and dataset databases; nobody else can change their schema;
- ``fgov_lineage`` (what tasks use) may INSERT and SELECT lineage rows, never UPDATE or DELETE;
- ``fgov_vault`` (what OpenBao uses) may create roles and grant membership in the dataset reader
  group roles, and terminate sessions; it reads no data itself;
- ``fgov_monitor`` has no privileges: pg_roles and pg_stat_activity suffice to prove a revocation;
- per dataset, a NOLOGIN group role with SELECT on that one table; CONNECT on the dataset database
  only. PUBLIC loses CONNECT on every database, so a leased role can reach nothing else;
- ``fgov_catalog``: EXECUTE on ``catalog.dataset_digest`` (row count and content hash of a dataset,
  computed as the owner) and nothing else;
- ``fgov_screen``: EXECUTE on ``catalog.dataset_rows`` (a dataset's rows, for the policy check's screening)
  and nothing else; only the control plane logs in to its role, never a task;
- ``fgov_inference``, the evaluation's NOLOGIN group: SELECT on ``evaluation.suites`` (the held-out
  prompt suites) and nothing else; no training role can read those suites, and this role cannot
  read training data.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

import psycopg
from psycopg import sql

from airflow_finetune_gov.datasets.demo import DATASETS
from airflow_finetune_gov.evaluation.builtin_suites import packaged_suites
from airflow_finetune_gov.lineage.store import create_schema
from airflow_finetune_gov.policy.engine import Policy

DAG_METADATA_ROLE = "airflow_dag"
LOGIN_ROLES = ("airflow", DAG_METADATA_ROLE, "fgov_owner", "fgov_lineage", "fgov_vault", "fgov_monitor")
# The auth manager's tables in Airflow's metadata database (FAB's users, password hashes, roles, permissions and
# its web sessions): the DAG user's login has no privilege on them
AUTH_TABLE = re.compile(r"^(ab_.*|session|alembic_version_fab)$")
GOVERNANCE_DB = "fgov_governance"
DATASETS_DB = "fgov_datasets"
INFERENCE_GROUP = "fgov_inference"
CATALOG_GROUP = "fgov_catalog"
SCREEN_GROUP = "fgov_screen"
SERVICE_GROUPS = {"inference": INFERENCE_GROUP, "catalog": CATALOG_GROUP, "screen": SCREEN_GROUP}

# Row count and content hash of one dataset table, without handing out its rows: the policy check
# calls this through a short `catalog` lease, so the approver sees exactly which data will be used,
# and the tuning step refuses rows that hash differently. The serialisation matches
# tuning.backends.rows_sha256: for each row in id order, "<len>:<prompt><len>:<response>\n".
DIGEST_FUNCTION = r"""
CREATE OR REPLACE FUNCTION catalog.dataset_digest(tbl text)
RETURNS TABLE (row_count bigint, sha256 text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
BEGIN
  IF tbl !~ '^datasets\.[a-z_][a-z0-9_]*$' OR to_regclass(tbl) IS NULL THEN
    RAISE EXCEPTION 'not a dataset table: %', tbl;
  END IF;
  RETURN QUERY EXECUTE format($q$
    SELECT count(*),
           encode(sha256(convert_to(coalesce(string_agg(
             length(prompt)::text || ':' || prompt || length(response)::text || ':' || response || chr(10),
             '' ORDER BY id), ''), 'UTF8')), 'hex')
    FROM %s $q$, tbl::regclass);
END $fn$;
"""

# A dataset's rows for the policy check's screening, in id order (the digest's order), through the control
# plane's `screen` lease: it reads rows of registered dataset tables and can write nothing.
ROWS_FUNCTION = r"""
CREATE OR REPLACE FUNCTION catalog.dataset_rows(tbl text)
RETURNS TABLE (id bigint, prompt text, response text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
BEGIN
  IF tbl !~ '^datasets\.[a-z_][a-z0-9_]*$' OR to_regclass(tbl) IS NULL THEN
    RAISE EXCEPTION 'not a dataset table: %', tbl;
  END IF;
  RETURN QUERY EXECUTE format('SELECT id::bigint, prompt, response FROM %s ORDER BY id', tbl::regclass);
END $fn$;
"""


def grant_dag_metadata(host: str, port: int, airflow_password: str) -> list[str]:
    """Give the DAG user's login (``airflow_dag``) what Airflow's DAG-side components use of the metadata database
    (its tables and sequences) and nothing of the auth manager's tables; run after every migration, as the owner
    of those tables. Returns the tables withheld."""
    withheld = []
    role = sql.Identifier(DAG_METADATA_ROLE)
    with psycopg.connect(**_conninfo("airflow", airflow_password, host, port, "airflow"), autocommit=True) as conn:
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(role))
        tables = [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for table in tables:
            ident = sql.Identifier("public", table)
            if AUTH_TABLE.match(table):
                conn.execute(sql.SQL("REVOKE ALL ON {} FROM {}").format(ident, role))
                withheld.append(table)
            else:
                conn.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(ident, role))
        conn.execute(sql.SQL("GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA public TO {}").format(role))
        for seq, in conn.execute("SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'").fetchall():
            if AUTH_TABLE.match(seq.removesuffix("_id_seq").removesuffix("_seq")):
                conn.execute(sql.SQL("REVOKE ALL ON SEQUENCE {} FROM {}").format(sql.Identifier("public", seq), role))
    return withheld


def group_role(dataset: str) -> str:
    if not re.fullmatch(r"[a-z0-9_]+", dataset):
        raise ValueError(f"dataset name {dataset!r} must be lower-case letters, digits, underscores")
    return f"fgov_read_{dataset}"


def url(user: str, password: str, host: str, port: int, db: str, driver: str = "postgresql+psycopg") -> str:
    from urllib.parse import quote

    return f"{driver}://{quote(user)}:{quote(password, safe='')}@{host}:{port}/{db}"


def _conninfo(user: str, password: str, host: str, port: int, db: str) -> dict:
    return {"user": user, "password": password, "host": host, "port": port, "dbname": db}


def provision(host: str, port: int, superuser_password: str, passwords: Mapping[str, str], policy: Policy,
              superuser: str = "postgres") -> None:
    with psycopg.connect(**_conninfo(superuser, superuser_password, host, port, "postgres"),
                         autocommit=True) as conn:
        for role in LOGIN_ROLES:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(sql.SQL("{} ROLE {} WITH LOGIN PASSWORD {}").format(
                sql.SQL(verb), sql.Identifier(role), sql.Literal(passwords[role])))
        conn.execute("ALTER ROLE fgov_vault WITH CREATEROLE")
        conn.execute("GRANT pg_signal_backend TO fgov_vault")
        for db, owner in (("airflow", "airflow"), (GOVERNANCE_DB, "fgov_owner"), (DATASETS_DB, "fgov_owner")):
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                conn.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(owner)))
            conn.execute(sql.SQL("REVOKE CONNECT, TEMPORARY ON DATABASE {} FROM PUBLIC").format(sql.Identifier(db)))
        conn.execute("REVOKE CONNECT, TEMPORARY ON DATABASE postgres FROM PUBLIC")
        conn.execute("GRANT CONNECT ON DATABASE postgres TO fgov_vault, fgov_monitor")
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO fgov_lineage").format(sql.Identifier(GOVERNANCE_DB)))
        conn.execute(sql.SQL("GRANT CONNECT ON DATABASE airflow TO {}").format(sql.Identifier(DAG_METADATA_ROLE)))
        for name in policy.datasets:
            grp = group_role(name)
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (grp,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(grp)))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(DATASETS_DB), sql.Identifier(grp)))
            conn.execute(sql.SQL("GRANT {} TO fgov_vault WITH ADMIN OPTION").format(sql.Identifier(grp)))
        # Evaluation reads its held-out suites with an inference-only role (no training role can), and
        # the policy check reads digests through a catalog role that cannot read rows.
        for grp in SERVICE_GROUPS.values():
            if not conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (grp,)).fetchone():
                conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(grp)))
            conn.execute(sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(DATASETS_DB), sql.Identifier(grp)))
            conn.execute(sql.SQL("GRANT {} TO fgov_vault WITH ADMIN OPTION").format(sql.Identifier(grp)))

    owner_pw = passwords["fgov_owner"]
    with psycopg.connect(**_conninfo("fgov_owner", owner_pw, host, port, DATASETS_DB), autocommit=True) as conn:
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute("CREATE SCHEMA IF NOT EXISTS datasets")
        conn.execute("REVOKE ALL ON SCHEMA datasets FROM PUBLIC")
        for name, entry in policy.datasets.items():
            schema, table = entry.table.split(".")
            ident = sql.Identifier(schema, table)
            if schema != "datasets":
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (id serial PRIMARY KEY, prompt text NOT NULL, response text NOT NULL)"
            ).format(ident))
            rows = DATASETS.get(name, [])
            count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(ident)).fetchone()
            if rows and count is not None and count[0] == 0:
                with conn.cursor() as cur:
                    cur.executemany(sql.SQL("INSERT INTO {} (prompt, response) VALUES (%s, %s)").format(ident), rows)
            reader = sql.Identifier(group_role(name))
            conn.execute(sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(sql.Identifier(schema), reader))
            conn.execute(sql.SQL("GRANT SELECT ON {} TO {}").format(ident, reader))

        conn.execute("CREATE SCHEMA IF NOT EXISTS evaluation")
        conn.execute("REVOKE ALL ON SCHEMA evaluation FROM PUBLIC")
        conn.execute("CREATE TABLE IF NOT EXISTS evaluation.suites (name text PRIMARY KEY, body text NOT NULL, "
                     "sha256 text NOT NULL)")
        for name, body in packaged_suites().items():
            conn.execute("INSERT INTO evaluation.suites (name, body, sha256) VALUES (%s, %s, %s) "
                         "ON CONFLICT (name) DO UPDATE SET body = EXCLUDED.body, sha256 = EXCLUDED.sha256",
                         (name, body, hashlib.sha256(body.encode()).hexdigest()))
        reader = sql.Identifier(INFERENCE_GROUP)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA evaluation TO {}").format(reader))
        conn.execute(sql.SQL("GRANT SELECT ON evaluation.suites TO {}").format(reader))
        conn.execute("CREATE SCHEMA IF NOT EXISTS catalog")
        conn.execute("REVOKE ALL ON SCHEMA catalog FROM PUBLIC")
        conn.execute(DIGEST_FUNCTION)
        conn.execute("REVOKE ALL ON FUNCTION catalog.dataset_digest(text) FROM PUBLIC")
        catalog = sql.Identifier(CATALOG_GROUP)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA catalog TO {}").format(catalog))
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION catalog.dataset_digest(text) TO {}").format(catalog))
        conn.execute(ROWS_FUNCTION)
        conn.execute("REVOKE ALL ON FUNCTION catalog.dataset_rows(text) FROM PUBLIC")
        screen = sql.Identifier(SCREEN_GROUP)
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA catalog TO {}").format(screen))
        conn.execute(sql.SQL("GRANT EXECUTE ON FUNCTION catalog.dataset_rows(text) TO {}").format(screen))

    with psycopg.connect(**_conninfo("fgov_owner", owner_pw, host, port, GOVERNANCE_DB), autocommit=True) as conn:
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute("GRANT USAGE ON SCHEMA public TO fgov_lineage")
    create_schema(url("fgov_owner", owner_pw, host, port, GOVERNANCE_DB), writer_role="fgov_lineage")

"""Configure a Vault or OpenBao server for governed fine-tuning (pure hvac, no Airflow import).

Idempotent: running it twice leaves the same configuration. What it sets up:
- the database secrets engine, with one role per dataset whose credentials can SELECT that
  dataset's table and nothing else (membership in a NOLOGIN group role; the leased role owns nothing);
  revocation terminates the role's sessions before dropping it (revoking does not end sessions);
- the JWT auth method, trusting the workload-identity public key, with one role per dataset
  (bound to a ``dataset`` claim) and a revoker role; run identifiers from the claims become token
  metadata, so the audit log names the DAG run behind every request;
- the policies those roles carry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import hvac

# The leased role only inherits SELECT from the dataset's NOLOGIN group role: it owns nothing, so
# DROP ROLE never fails on owned objects, and VALID UNTIL bounds it even if revocation never runs.
CREATION_SQL = (
    'CREATE ROLE "{{{{name}}}}" WITH LOGIN PASSWORD \'{{{{password}}}}\' '
    "VALID UNTIL '{{{{expiration}}}}' INHERIT IN ROLE {group};",
)
# Sessions of a revoked role stay open unless terminated (vault#8668); terminate, then drop.
REVOCATION_SQL = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{{name}}';",
    'DROP ROLE IF EXISTS "{{name}}";',
)


@dataclass(frozen=True)
class DatasetGrant:
    name: str
    group_role: str


@dataclass
class BootstrapSpec:
    db_connection_url: str  # e.g. postgresql://{{username}}:{{password}}@127.0.0.1:5432/postgres
    db_username: str
    db_password: str
    datasets: list[DatasetGrant]
    jwt_public_key_pem: str
    issuer: str = "airflow-finetune-gov"
    audience: str = "openbao"
    database_mount: str = "fgov-database"
    jwt_mount: str = "fgov-jwt"
    default_ttl: str = "1h"
    max_ttl: str = "24h"
    dag_id_glob: str = "*"
    extra: Mapping[str, Any] = field(default_factory=dict)


def lease_policy_name(dataset: str) -> str:
    return f"fgov-lease-{dataset}"


def lease_role_name(dataset: str) -> str:
    return f"lease-{dataset}"


def db_role_name(dataset: str) -> str:
    return f"ds-{dataset}"


REVOKER_ROLE = "revoker"
REVOKER_POLICY = "fgov-revoker"


def _lease_policy(spec: BootstrapSpec, dataset: str) -> str:
    return (
        f'path "{spec.database_mount}/creds/{db_role_name(dataset)}" {{ capabilities = ["read"] }}\n'
        'path "sys/leases/renew" { capabilities = ["update"] }\n'
        'path "sys/leases/lookup" { capabilities = ["update"] }\n'
    )


def _revoker_policy(spec: BootstrapSpec) -> str:
    return (
        'path "sys/leases/revoke" { capabilities = ["update"] }\n'
        'path "sys/leases/lookup" { capabilities = ["update"] }\n'
        f'path "sys/leases/lookup/{spec.database_mount}/creds/*" {{ capabilities = ["list", "sudo"] }}\n'
        'path "auth/token/revoke-accessor" { capabilities = ["update"] }\n'
    )


def _write_jwt_role(client: hvac.Client, mount: str, name: str, **params: Any) -> None:
    # Written through the raw API: the request body mirrors the server's documented fields exactly.
    client.adapter.post(f"/v1/auth/{mount}/role/{name}", json=params)


def bootstrap(client: hvac.Client, spec: BootstrapSpec) -> dict[str, Any]:
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    if f"{spec.database_mount}/" not in mounts:
        client.sys.enable_secrets_engine("database", path=spec.database_mount)

    client.secrets.database.configure(
        name="fgov-datasets",
        plugin_name="postgresql-database-plugin",
        connection_url=spec.db_connection_url,
        username=spec.db_username,
        password=spec.db_password,
        allowed_roles=[db_role_name(d.name) for d in spec.datasets],
        verify_connection=True,
        mount_point=spec.database_mount,
    )
    for ds in spec.datasets:
        client.secrets.database.create_role(
            name=db_role_name(ds.name),
            db_name="fgov-datasets",
            creation_statements=[s.format(group=ds.group_role) for s in CREATION_SQL],
            revocation_statements=list(REVOCATION_SQL),
            default_ttl=spec.default_ttl,
            max_ttl=spec.max_ttl,
            mount_point=spec.database_mount,
        )
        client.sys.create_or_update_policy(name=lease_policy_name(ds.name), policy=_lease_policy(spec, ds.name))
    client.sys.create_or_update_policy(name=REVOKER_POLICY, policy=_revoker_policy(spec))

    auths = client.sys.list_auth_methods()
    auths = auths.get("data", auths)
    if f"{spec.jwt_mount}/" not in auths:
        client.sys.enable_auth_method("jwt", path=spec.jwt_mount)
    client.auth.jwt.configure(
        jwt_validation_pubkeys=[spec.jwt_public_key_pem],
        bound_issuer=spec.issuer,
        path=spec.jwt_mount,
    )
    claim_mappings = {
        "dag_id": "dag_id", "run_id": "run_id", "task_id": "task_id", "try_number": "try_number",
        "dataset": "dataset", "approval_id": "approval_id",
    }
    for ds in spec.datasets:
        _write_jwt_role(
            client, spec.jwt_mount, lease_role_name(ds.name),
            role_type="jwt",
            user_claim="sub",
            bound_audiences=[spec.audience],
            bound_claims={"dataset": ds.name, "purpose": "lease", "dag_id": spec.dag_id_glob},
            bound_claims_type="glob",
            claim_mappings=claim_mappings,
            token_policies=[lease_policy_name(ds.name)],
            token_ttl=spec.default_ttl,
            token_max_ttl=spec.max_ttl,
            token_no_default_policy=False,
        )
    _write_jwt_role(
        client, spec.jwt_mount, REVOKER_ROLE,
        role_type="jwt",
        user_claim="sub",
        bound_audiences=[spec.audience],
        bound_claims={"purpose": "revoke", "dag_id": spec.dag_id_glob},
        bound_claims_type="glob",
        claim_mappings=claim_mappings,
        token_policies=[REVOKER_POLICY],
        token_ttl="10m",  # noqa: S106 - a duration, not a password
        token_max_ttl="30m",  # noqa: S106
    )
    return {
        "database_mount": spec.database_mount,
        "jwt_mount": spec.jwt_mount,
        "database_roles": [db_role_name(d.name) for d in spec.datasets],
        "jwt_roles": [lease_role_name(d.name) for d in spec.datasets] + [REVOKER_ROLE],
    }

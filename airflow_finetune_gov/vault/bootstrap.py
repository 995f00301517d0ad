"""Configure a Vault or OpenBao server for governed fine-tuning (pure hvac, no Airflow import).

Idempotent: running it twice leaves the same configuration. What it sets up:
- the database secrets engine, with one role per dataset whose credentials can SELECT that
  dataset's table and nothing else (membership in a NOLOGIN group role; the leased role owns nothing);
  revocation terminates the role's sessions before dropping it (revoking does not end sessions);
- a KV v2 mount for the credential hand-over: the lease task writes the response-wrapped
  credentials there and only the same run's tuning task can read them (templated policies bind the
  path to the ``run_key`` claim), so the wrapping token never travels through XCom;
- a KV v2 mount for tuning backends' API keys (e.g. ``openai``), readable by the tune roles only;
- the JWT auth method, trusting the workload-identity public key, with per-dataset roles for leasing
  (``lease-<ds>``) and for the tuning process (``tune-<ds>``: take the hand-over, renew the lease),
  service roles (``inference``: evaluation reads its suites; ``catalog``: the policy check reads a
  dataset's row count and content hash, never its rows; ``screen``: the policy check's screening reads a
  dataset's rows, and only the control plane may log in to it), and a revoker role; run identifiers
  from the claims become token metadata, so the audit log names the DAG run behind every request;
- the policies those roles carry;
- a transit engine with a non-exportable ed25519 key that signs promoted models' provenance, and a
  non-exportable ECDSA P-256 key that signs their OpenSSF model-signing bundle; only the ``provenance``
  role (the promotion) may use them, to sign; the public keys are returned.

A lease cannot outlive the token that created it, so the ``lease-<ds>`` tokens live for the policy's
maximum lease TTL; the lease itself is issued for the TTL derived from the job's expected duration
and renewed by the tuning task while it runs. The revoker revokes that token with the lease.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import hvac
import hvac.exceptions

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
    handover_mount: str = "fgov-handover"
    backends_mount: str = "fgov-backends"  # KV v2: tuning backends' API keys, read by the tune roles
    transit_mount: str = "fgov-transit"  # transit: the provenance signing key (never exported)
    provenance_key: str = "fgov-provenance"
    model_signing_key: str = "fgov-model-signing"  # transit ECDSA P-256: the OpenSSF model-signing bundle
    # Short-lived service leases, name -> NOLOGIN group role, e.g. {"inference": "fgov_inference",
    # "catalog": "fgov_catalog"}. Each gets a database role, a policy and a JWT role of that name.
    service_roles: Mapping[str, str] = field(default_factory=dict)
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


def tune_role_name(dataset: str) -> str:
    return f"tune-{dataset}"


def tune_policy_name(dataset: str) -> str:
    return f"fgov-tune-{dataset}"


REVOKER_ROLE = "revoker"
REVOKER_POLICY = "fgov-revoker"
PROVENANCE_ROLE = "provenance"
PROVENANCE_POLICY = "fgov-provenance"
# Reads model endpoints' keys (the backends mount) for the evaluation of a remote model and the check of its
# job with the provider: logged in to by the control plane only, never by a task
ENDPOINTS_ROLE = "endpoints"
ENDPOINTS_POLICY = "fgov-endpoints"
INFERENCE = "inference"
CATALOG = "catalog"


def service_policy_name(service: str) -> str:
    return f"fgov-{service}"


def _run_key_template(jwt_accessor: str) -> str:
    return f"{{{{identity.entity.aliases.{jwt_accessor}.metadata.run_key}}}}"


def _lease_policy(spec: BootstrapSpec, dataset: str, jwt_accessor: str) -> str:
    run = _run_key_template(jwt_accessor)
    return (
        f'path "{spec.database_mount}/creds/{db_role_name(dataset)}" {{ capabilities = ["read"] }}\n'
        # set the lease's TTL right after issue (renew with an increment)
        f'path "sys/leases/renew/{spec.database_mount}/creds/{db_role_name(dataset)}/*" '
        '{ capabilities = ["update"] }\n'
        # hand the wrapped credentials over to this run's tuning task, and to nobody else
        f'path "{spec.handover_mount}/data/{dataset}/{run}/*" {{ capabilities = ["create", "update"] }}\n'
    )


def _tune_policy(spec: BootstrapSpec, dataset: str, jwt_accessor: str) -> str:
    run = _run_key_template(jwt_accessor)
    return (
        f'path "{spec.handover_mount}/data/{dataset}/{run}/*" {{ capabilities = ["read"] }}\n'
        f'path "{spec.handover_mount}/metadata/{dataset}/{run}/*" {{ capabilities = ["delete"] }}\n'
        f'path "sys/leases/renew/{spec.database_mount}/creds/{db_role_name(dataset)}/*" '
        '{ capabilities = ["update"] }\n'
        # a remote tuning backend's API key (read in the worker, and again by the deferred trigger)
        f'path "{spec.backends_mount}/data/*" {{ capabilities = ["read"] }}\n'
    )


def _service_policy(spec: BootstrapSpec, service: str) -> str:
    return (
        f'path "{spec.database_mount}/creds/{service}" {{ capabilities = ["read"] }}\n'
        f'path "sys/leases/renew/{spec.database_mount}/creds/{service}/*" {{ capabilities = ["update"] }}\n'
    )


def _revoker_policy(spec: BootstrapSpec) -> str:
    return (
        'path "sys/leases/revoke" { capabilities = ["update"] }\n'
        'path "sys/leases/lookup" { capabilities = ["update"] }\n'
        f'path "sys/leases/lookup/{spec.database_mount}/creds/*" {{ capabilities = ["list", "sudo"] }}\n'
        'path "auth/token/revoke-accessor" { capabilities = ["update"] }\n'
        # clear a hand-over nobody took (tuning never started)
        f'path "{spec.handover_mount}/metadata/*" {{ capabilities = ["delete"] }}\n'
    )


def _provenance_policy(spec: BootstrapSpec) -> str:
    # sign only (and read the model-signing key's public half, which the bundle names): the keys cannot be
    # exported, rotated or deleted by the promotion identity
    return "".join(f'path "{spec.transit_mount}/sign/{key}" {{ capabilities = ["update"] }}\n'
                   for key in (spec.provenance_key, spec.model_signing_key)) + \
        f'path "{spec.transit_mount}/keys/{spec.model_signing_key}" {{ capabilities = ["read"] }}\n'


def _endpoints_policy(spec: BootstrapSpec) -> str:
    return f'path "{spec.backends_mount}/data/*" {{ capabilities = ["read"] }}\n'


def _write_jwt_role(client: hvac.Client, mount: str, name: str, **params: Any) -> None:
    # Written through the raw API: the request body mirrors the server's documented fields exactly.
    client.adapter.post(f"/v1/auth/{mount}/role/{name}", json=params)


def bootstrap(client: hvac.Client, spec: BootstrapSpec) -> dict[str, Any]:
    mounts = client.sys.list_mounted_secrets_engines()
    mounts = mounts.get("data", mounts)
    if f"{spec.database_mount}/" not in mounts:
        client.sys.enable_secrets_engine("database", path=spec.database_mount)
    if f"{spec.handover_mount}/" not in mounts:
        client.sys.enable_secrets_engine("kv", path=spec.handover_mount, options={"version": "2"})
    if f"{spec.backends_mount}/" not in mounts:
        client.sys.enable_secrets_engine("kv", path=spec.backends_mount, options={"version": "2"})
    if f"{spec.transit_mount}/" not in mounts:
        client.sys.enable_secrets_engine("transit", path=spec.transit_mount)
    try:
        client.secrets.transit.read_key(name=spec.provenance_key, mount_point=spec.transit_mount)
    except hvac.exceptions.InvalidPath:
        client.secrets.transit.create_key(name=spec.provenance_key, key_type="ed25519", exportable=False,
                                          allow_plaintext_backup=False, mount_point=spec.transit_mount)
    try:
        client.secrets.transit.read_key(name=spec.model_signing_key, mount_point=spec.transit_mount)
    except hvac.exceptions.InvalidPath:
        client.secrets.transit.create_key(name=spec.model_signing_key, key_type="ecdsa-p256", exportable=False,
                                          allow_plaintext_backup=False, mount_point=spec.transit_mount)

    db_roles = [db_role_name(d.name) for d in spec.datasets] + list(spec.service_roles)
    client.secrets.database.configure(
        name="fgov-datasets",
        plugin_name="postgresql-database-plugin",
        connection_url=spec.db_connection_url,
        username=spec.db_username,
        password=spec.db_password,
        allowed_roles=db_roles,
        verify_connection=True,
        mount_point=spec.database_mount,
    )
    groups = {db_role_name(d.name): d.group_role for d in spec.datasets} | dict(spec.service_roles)
    for db_role, group in groups.items():
        client.secrets.database.create_role(
            name=db_role,
            db_name="fgov-datasets",
            creation_statements=[s.format(group=group) for s in CREATION_SQL],
            revocation_statements=list(REVOCATION_SQL),
            default_ttl=spec.default_ttl,
            max_ttl=spec.max_ttl,
            mount_point=spec.database_mount,
        )

    auths = client.sys.list_auth_methods()
    auths = auths.get("data", auths)
    if f"{spec.jwt_mount}/" not in auths:
        client.sys.enable_auth_method("jwt", path=spec.jwt_mount)
        auths = client.sys.list_auth_methods()
        auths = auths.get("data", auths)
    jwt_accessor = auths[f"{spec.jwt_mount}/"]["accessor"]
    client.auth.jwt.configure(
        jwt_validation_pubkeys=[spec.jwt_public_key_pem],
        bound_issuer=spec.issuer,
        path=spec.jwt_mount,
    )

    for ds in spec.datasets:
        client.sys.create_or_update_policy(name=lease_policy_name(ds.name),
                                           policy=_lease_policy(spec, ds.name, jwt_accessor))
        client.sys.create_or_update_policy(name=tune_policy_name(ds.name),
                                           policy=_tune_policy(spec, ds.name, jwt_accessor))
    client.sys.create_or_update_policy(name=REVOKER_POLICY, policy=_revoker_policy(spec))
    client.sys.create_or_update_policy(name=PROVENANCE_POLICY, policy=_provenance_policy(spec))
    client.sys.create_or_update_policy(name=ENDPOINTS_POLICY, policy=_endpoints_policy(spec))
    for service in spec.service_roles:
        client.sys.create_or_update_policy(name=service_policy_name(service), policy=_service_policy(spec, service))

    claim_mappings = {
        "dag_id": "dag_id", "run_id": "run_id", "task_id": "task_id", "try_number": "try_number",
        "run_key": "run_key", "dataset": "dataset", "approval_id": "approval_id",
    }

    def role(name: str, bound: dict[str, str], policies: list[str], ttl: str, max_ttl: str) -> None:
        _write_jwt_role(
            client, spec.jwt_mount, name,
            role_type="jwt",
            user_claim="sub",
            bound_audiences=[spec.audience],
            bound_claims={**bound, "dag_id": spec.dag_id_glob},
            bound_claims_type="glob",
            claim_mappings=claim_mappings,
            token_policies=policies,
            token_ttl=ttl,
            token_max_ttl=max_ttl,
            token_no_default_policy=False,
            # tighter than the defaults (60/150/150 s): a workload token is minted for immediate use
            clock_skew_leeway=30,
            expiration_leeway=30,
            not_before_leeway=30,
        )

    for ds in spec.datasets:
        # The lease's token lives as long as the longest lease the policy allows: a lease cannot
        # outlive its token, and a shorter token would silently cut a long job's credentials.
        # approval_id "*": OpenBao itself refuses a lease identity that names no approval
        role(lease_role_name(ds.name), {"dataset": ds.name, "purpose": "lease", "approval_id": "*"},
             [lease_policy_name(ds.name)], spec.max_ttl, spec.max_ttl)
        role(tune_role_name(ds.name), {"dataset": ds.name, "purpose": "tune"},
             [tune_policy_name(ds.name)], "10m", "30m")
    role(REVOKER_ROLE, {"purpose": "revoke"}, [REVOKER_POLICY], "10m", "30m")
    role(PROVENANCE_ROLE, {"purpose": "provenance"}, [PROVENANCE_POLICY], "5m", "10m")
    role(ENDPOINTS_ROLE, {"purpose": "endpoints"}, [ENDPOINTS_POLICY], "5m", "10m")
    for service in spec.service_roles:
        role(service, {"purpose": service}, [service_policy_name(service)], "10m", "30m")
    jwt_roles = [lease_role_name(d.name) for d in spec.datasets] + [tune_role_name(d.name) for d in spec.datasets]
    jwt_roles += [REVOKER_ROLE, PROVENANCE_ROLE, ENDPOINTS_ROLE, *spec.service_roles]
    from airflow_finetune_gov.registry.provenance import transit_public_key, transit_public_keys

    return {
        "transit_mount": spec.transit_mount,
        "provenance_key": spec.provenance_key,
        "provenance_public_keys": transit_public_keys(client, spec.transit_mount, spec.provenance_key),
        "model_signing_key": spec.model_signing_key,
        "model_signing_public_key": transit_public_key(client, spec.transit_mount, spec.model_signing_key),
        "database_mount": spec.database_mount,
        "handover_mount": spec.handover_mount,
        "backends_mount": spec.backends_mount,
        "jwt_mount": spec.jwt_mount,
        "database_roles": db_roles,
        "jwt_roles": jwt_roles,
    }

"""GovernedLeaseHook: the lease broker inside Airflow, logged in through the HashiCorp ``VaultHook``.

With the connection's ``auth_type`` set to ``jwt`` (the default here), every call logs in with a
JWT minted for exactly this task try (``dag_id``, ``run_id``, ``task_id``, ``try_number``,
``run_key``, ``purpose``, and for leases the dataset and approval id): OpenBao's JWT roles bind
those claims, templated policies bind hand-over paths to the run, and the claims become token
metadata that the audit log records. Any other ``VaultHook`` auth type (kubernetes, approle, gcp,
aws_iam, ...) works too - then the platform identity's own policies decide the dataset scope. A
static ``token`` auth type is refused: it is a standing credential, which this provider exists to
remove.
"""

from __future__ import annotations

import hvac
import hvac.exceptions
from airflow.sdk import BaseHook

from airflow_finetune_gov import settings
from airflow_finetune_gov.credentials.broker import LeaseError
from airflow_finetune_gov.credentials.identity import TaskIdentity, load_key, mint


def signing_key() -> bytes:
    variable = settings.get("workload_identity_key_secret", required=False)
    if variable:
        from airflow.sdk import Variable

        try:
            return str(Variable.get(variable)).encode()
        except Exception as exc:  # KeyError / AirflowRuntimeError, depending on where we run
            raise LeaseError(f"the workload-identity signing key secret {variable!r} cannot be read: "
                             f"{type(exc).__name__}; set [finetune_gov] workload_identity_key_secret to an "
                             "existing Variable or use workload_identity_key_path") from None
    return load_key(settings.get("workload_identity_key_path"))


class GovernedLeaseHook(BaseHook):
    """Log in to Vault/OpenBao as one task try, for one purpose (``lease``, ``tune``, ``revoke``, ...)."""

    conn_name_attr = "vault_conn_id"
    default_conn_name = "vault_default"
    conn_type = "vault"
    hook_name = "Governed credential lease (Vault/OpenBao)"

    def __init__(self, vault_conn_id: str | None = None, *, timeout: float | None = None) -> None:
        super().__init__()
        self.vault_conn_id = vault_conn_id or settings.get("vault_conn_id")
        self.timeout = float(timeout if timeout is not None else settings.get("vault_timeout_seconds"))

    def auth_type(self) -> str:
        conn = self.get_connection(self.vault_conn_id)
        return str(conn.extra_dejson.get("auth_type") or "jwt")

    def client(self, identity: TaskIdentity, *, role: str, purpose: str,
               extra: dict[str, str] | None = None) -> hvac.Client:
        from airflow.providers.hashicorp.hooks.vault import VaultHook

        from airflow_finetune_gov import common

        if common.remote():
            # A task holds no signing key: the control plane logs in as this task (it knows which one from
            # the kernel, not from ``identity``) for a role the run entitles it to, and hands over the token.
            from airflow_finetune_gov.control.client import ControlPlaneError

            try:
                token = common.control().login(role, purpose, extra)
            except ControlPlaneError as exc:
                raise LeaseError(f"the control plane refused a {role} login (purpose {purpose}): {exc}") from None
            return hvac.Client(url=common.vault_addr(self.vault_conn_id), token=token, timeout=self.timeout)
        auth_type = self.auth_type()
        if auth_type == "token":
            raise LeaseError(f"connection {self.vault_conn_id!r} uses a static Vault token; governed tasks log "
                             "in with workload identity: set its extra auth_type to 'jwt' (or kubernetes, "
                             "approle, ...)")
        if auth_type == "jwt":
            token = mint(identity, key_pem=signing_key(), issuer=settings.get("workload_identity_issuer"),
                         audience=settings.get("workload_identity_audience"), purpose=purpose, extra=extra)
            hook = VaultHook(vault_conn_id=self.vault_conn_id, auth_type="jwt", jwt_role=role, jwt_token=token,
                             auth_mount_point=settings.get("jwt_auth_mount"), timeout=self.timeout)
        else:
            hook = VaultHook(vault_conn_id=self.vault_conn_id, timeout=self.timeout)
        try:
            return hook.get_conn()
        except hvac.exceptions.VaultError as exc:
            raise LeaseError(login_error(role, purpose, exc)) from None


def login_error(role: str, purpose: str, exc: BaseException) -> str:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "role" in detail.lower() and ("not found" in detail.lower() or "could not be found" in detail.lower()):
        return (f"OpenBao has no JWT role {role!r} (purpose {purpose}): the dataset is not configured for "
                f"governed leases; add it to the policy file and run `fgov vault bootstrap` ({detail})")
    return (f"OpenBao refused this task's workload identity for role {role!r} (purpose {purpose}): {detail}. "
            "An expired token, a token signed by another key, or claims the role does not bind are refused.")


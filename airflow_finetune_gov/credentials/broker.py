"""The lease broker: dataset-scoped dynamic database credentials over hvac (no Airflow import).

Issue, hand over, revoke, and prove the revocation. The secret itself never leaves this module
except to the tuning process: ``issue`` response-wraps ``{username, password}`` so that only a
single-use wrapping token travels between tasks, and ``unwrap`` checks that token's accessor
against the one recorded at issue time (a substituted or already-used token is refused).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import hvac
import hvac.exceptions
from sqlalchemy import create_engine, text


class LeaseError(RuntimeError):
    pass


@dataclass(frozen=True)
class IssuedLease:
    lease_id: str
    db_role: str
    lease_duration: int
    renewable: bool
    token_accessor: str
    wrap_token: str
    wrap_accessor: str
    wrap_token_sha256: str

    def public(self) -> dict[str, Any]:
        """Everything but the wrapping token: what lineage and logs may hold."""
        data = asdict(self)
        data.pop("wrap_token")
        return data


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the password by accident
        return f"Credentials(username={self.username!r}, password=***)"


class LeaseBroker:
    def __init__(self, client: hvac.Client, database_mount: str) -> None:
        self.client = client
        self.mount = database_mount

    def issue(self, db_role_name: str, *, wrap_ttl_seconds: int) -> IssuedLease:
        try:
            resp = self.client.secrets.database.generate_credentials(db_role_name, mount_point=self.mount)
        except hvac.exceptions.Forbidden as exc:
            raise LeaseError(f"OpenBao refused credentials for {self.mount}/creds/{db_role_name}: this "
                             "identity's policy does not cover that dataset") from exc
        data = resp["data"]
        lookup = self.client.auth.token.lookup_self()["data"]
        try:
            wrapped = self.client.sys.wrap(payload={"username": data["username"], "password": data["password"]},
                                           ttl=f"{wrap_ttl_seconds}s")
        except Exception:
            # Never leave a credential nobody can hand over: revoke it before failing.
            self.client.sys.revoke_lease(resp["lease_id"])
            raise
        info = wrapped["wrap_info"]
        return IssuedLease(lease_id=resp["lease_id"], db_role=data["username"],
                           lease_duration=int(resp["lease_duration"]), renewable=bool(resp["renewable"]),
                           token_accessor=lookup["accessor"], wrap_token=info["token"],
                           wrap_accessor=info["accessor"], wrap_token_sha256=token_digest(info["token"]))


def token_digest(token: str) -> str:
    """sha256 of a wrapping token: recorded at issue so the consumer can tell ours from a substitute."""
    return hashlib.sha256(token.encode()).hexdigest()


def unwrap(addr: str, wrap_token: str, *, expected_digest: str, verify: bool | str = True) -> Credentials:
    """Unwrap the handed-over credentials, refusing a token that is not the one recorded at issue."""
    if token_digest(wrap_token) != expected_digest:
        raise LeaseError("the credential wrapping token is not the one recorded when the lease was issued")
    client = hvac.Client(url=addr, verify=verify)
    try:
        lookup = client.adapter.post("/v1/sys/wrapping/lookup", json={"token": wrap_token})
    except hvac.exceptions.VaultError as exc:
        raise LeaseError("the credential wrapping token is invalid, expired or already used: somebody else "
                         "may have unwrapped it; revoke the lease") from exc
    props = lookup["data"] if isinstance(lookup, dict) else lookup.json()["data"]
    if props.get("creation_path") != "sys/wrapping/wrap":
        raise LeaseError(f"unexpected wrapping creation path {props.get('creation_path')!r}")
    client.token = wrap_token
    try:
        resp = client.sys.unwrap()
    except hvac.exceptions.VaultError as exc:
        raise LeaseError("unwrapping the credentials failed (token used or expired meanwhile)") from exc
    data = resp["data"]
    return Credentials(username=data["username"], password=data["password"])


def revoke(client: hvac.Client, lease_id: str, *, attempts: int = 5, base_delay: float = 0.5,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """Revoke synchronously (the server does not retry a failed ``sync`` revocation); retry with backoff.

    Returns the number of attempts used. A lease that no longer exists counts as revoked.
    """
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            client.adapter.put("/v1/sys/leases/revoke", json={"lease_id": lease_id, "sync": True})
            return attempt
        except hvac.exceptions.InvalidRequest as exc:
            if "invalid lease" in str(exc).lower() or "not found" in str(exc).lower():
                return attempt
            last = exc
        except (hvac.exceptions.VaultError, OSError) as exc:  # includes connection errors
            last = exc
        except Exception as exc:  # requests.ConnectionError while OpenBao restarts
            last = exc
        if attempt < attempts:
            sleep(base_delay * 2 ** (attempt - 1))
    raise LeaseError(f"could not revoke lease {lease_id} after {attempts} attempts: {last}")


def revoke_token_accessor(client: hvac.Client, accessor: str) -> bool:
    try:
        client.auth.token.revoke_accessor(accessor)
        return True
    except hvac.exceptions.InvalidRequest:
        return False  # already gone (expired or revoked)


def verify_role_gone(monitor_url: str, db_role: str) -> dict[str, int]:
    """Prove the revocation on the database itself: the role is dropped and none of its sessions remain."""
    engine = create_engine(monitor_url, future=True)
    try:
        with engine.connect() as conn:
            roles = conn.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = :r"), {"r": db_role}).scalar()
            sessions = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE usename = :r"),
                                    {"r": db_role}).scalar()
    finally:
        engine.dispose()
    return {"roles": int(roles or 0), "sessions": int(sessions or 0)}

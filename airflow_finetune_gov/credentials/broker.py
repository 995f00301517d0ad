"""The lease broker: dataset-scoped dynamic database credentials over hvac (no Airflow import).

Issue, hand over, renew, revoke, and prove the revocation. The secret itself never leaves this
module except to the tuning process: ``issue`` response-wraps ``{username, password}`` and
``hand_over`` stores only that single-use wrapping token in a KV path that OpenBao's templated
policies open to this run's tuning identity alone, so nothing secret travels through XCom.
``unwrap`` checks the token against the digest recorded at issue time and the wrap's
``creation_path`` (a substituted or already-used token is refused).
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import hvac
import hvac.exceptions
from sqlalchemy import Engine, create_engine, text

WRAP_CREATION_PATH = "sys/wrapping/wrap"


class LeaseError(RuntimeError):
    pass


@dataclass(frozen=True)
class IssuedLease:
    lease_id: str
    db_role: str
    lease_duration: int
    requested_ttl: int
    renewable: bool
    token_accessor: str
    wrap_token: str
    wrap_accessor: str
    wrap_token_sha256: str

    def public(self) -> dict[str, Any]:
        """Everything but the wrapping token: what lineage, XCom and logs may hold."""
        data = asdict(self)
        data.pop("wrap_token")
        return data


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str

    def __repr__(self) -> str:  # never print the password by accident
        return f"Credentials(username={self.username!r}, password=***)"


def derive_ttl(expected_seconds: float | None, *, default_seconds: int, min_seconds: int, max_seconds: int,
               margin: float = 1.5) -> int:
    """The lease TTL for a job expected to take ``expected_seconds``: with a margin, within policy bounds.

    Renewal covers jobs that run longer than expected, up to ``max_seconds`` (the policy's cap and
    the lifetime of the token that owns the lease).
    """
    if expected_seconds is None:
        wanted = default_seconds
    elif expected_seconds <= 0:
        raise LeaseError(f"expected duration must be positive, got {expected_seconds}s")
    else:
        wanted = int(expected_seconds * margin + 0.999)
    return max(min_seconds, min(wanted, max_seconds))


def _lease_suffix(lease_id: str) -> str:
    return hashlib.sha256(lease_id.encode()).hexdigest()[:24]


def handover_path(dataset: str, run_key: str, lease_id: str) -> str:
    return f"{dataset}/{run_key}/{_lease_suffix(lease_id)}"


class LeaseBroker:
    """Issue one lease per login. Revocation also revokes the token that owned the lease (and with it
    any other lease that token issued), so log in again for the next lease."""

    def __init__(self, client: hvac.Client, database_mount: str, handover_mount: str = "fgov-handover") -> None:
        self.client = client
        self.mount = database_mount
        self.handover_mount = handover_mount

    def issue(self, db_role_name: str, *, ttl_seconds: int, wrap_ttl_seconds: int) -> IssuedLease:
        try:
            resp = self.client.secrets.database.generate_credentials(db_role_name, mount_point=self.mount)
        except hvac.exceptions.Forbidden as exc:
            raise LeaseError(f"OpenBao refused credentials for {self.mount}/creds/{db_role_name}: this "
                             "identity's policy does not cover that dataset") from exc
        except hvac.exceptions.InvalidRequest as exc:
            raise LeaseError(f"OpenBao has no database role {self.mount}/creds/{db_role_name}: add the dataset "
                             f"to the policy file and run `fgov vault bootstrap` ({exc})") from exc
        lease_id = resp["lease_id"]
        try:
            data = resp["data"]
            duration = renew(self.client, lease_id, ttl_seconds)
            lookup = self.client.auth.token.lookup_self()["data"]
            wrapped = self.client.sys.wrap(payload={"username": data["username"], "password": data["password"]},
                                           ttl=f"{wrap_ttl_seconds}s")
            info = wrapped["wrap_info"]
        except BaseException:
            # Never leave a credential nobody can hand over. The lease identity may not revoke leases,
            # but it may revoke its own token, which takes the lease with it (then re-raise the cause).
            abandon(self.client)
            raise
        return IssuedLease(lease_id=lease_id, db_role=data["username"], lease_duration=duration,
                           requested_ttl=ttl_seconds, renewable=bool(resp["renewable"]),
                           token_accessor=lookup["accessor"], wrap_token=info["token"],
                           wrap_accessor=info["accessor"], wrap_token_sha256=token_digest(info["token"]))

    def hand_over(self, dataset: str, run_key: str, issued: IssuedLease) -> str:
        """Park the wrapping token where only this run's tuning identity can take it (once)."""
        path = handover_path(dataset, run_key, issued.lease_id)
        self.client.secrets.kv.v2.create_or_update_secret(
            path=path, secret={"wrap_token": issued.wrap_token, "lease_id": issued.lease_id},
            mount_point=self.handover_mount)
        return path


def abandon(client: hvac.Client) -> bool:
    """Revoke the calling token (``auth/token/revoke-self``, in every token's default policy), and with
    it every lease it issued. Best effort, for cleaning up after a failure; never raises."""
    try:
        client.auth.token.revoke_self()
        return True
    except Exception:
        return False


def take_handover(client: hvac.Client, handover_mount: str, dataset: str, run_key: str, lease_id: str) -> str:
    """Read the wrapping token parked for this run's lease and destroy it (every version) in one go."""
    path = handover_path(dataset, run_key, lease_id)
    try:
        resp = client.secrets.kv.v2.read_secret_version(path=path, mount_point=handover_mount,
                                                        raise_on_deleted_version=True)
    except hvac.exceptions.InvalidPath as exc:
        raise LeaseError(f"no credential hand-over is parked for lease {lease_id}: it was already taken "
                         "(a retried tuning task needs a new lease) or never written") from exc
    except hvac.exceptions.Forbidden as exc:
        raise LeaseError("OpenBao refused the credential hand-over to this identity: only the same run's "
                         "tuning task may take it") from exc
    client.secrets.kv.v2.delete_metadata_and_all_versions(path=path, mount_point=handover_mount)
    data = resp["data"]["data"]
    if data.get("lease_id") != lease_id:
        raise LeaseError("the parked hand-over names another lease")
    return str(data["wrap_token"])


def read_backend_secret(client: hvac.Client, mount: str, path: str) -> dict[str, str]:
    """A tuning backend's secret (e.g. ``{"OPENAI_API_KEY": ...}``) from the KV v2 ``mount``, read as the
    caller's identity (the run's ``tune-<dataset>`` role may read the backends mount)."""
    try:
        resp = client.secrets.kv.v2.read_secret_version(path=path, mount_point=mount, raise_on_deleted_version=True)
    except hvac.exceptions.InvalidPath:
        raise LeaseError(f"no backend secret at {mount}/{path} in OpenBao: write it first, e.g. "
                         f"`bao kv put -mount={mount} {path} OPENAI_API_KEY=...`") from None
    except hvac.exceptions.Forbidden:
        raise LeaseError(f"OpenBao refused the backend secret {mount}/{path} to this tuning identity: run "
                         "`fgov vault bootstrap` so the tune roles may read the backends mount") from None
    return {str(k): str(v) for k, v in resp["data"]["data"].items()}


def renew(client: hvac.Client, lease_id: str, increment_seconds: int) -> int:
    """Set the lease's remaining TTL to ``increment_seconds`` (capped by the role's max TTL and by the
    lifetime of the token that owns the lease); returns the TTL the server granted."""
    try:
        resp = client.adapter.put(f"/v1/sys/leases/renew/{lease_id}", json={"increment": int(increment_seconds)})
    except hvac.exceptions.Forbidden as exc:
        raise LeaseError(f"OpenBao refused to renew lease {lease_id} for this identity") from exc
    except hvac.exceptions.InvalidRequest as exc:
        raise LeaseError(f"lease {lease_id} cannot be renewed: {exc}") from exc
    body = resp if isinstance(resp, dict) else resp.json()
    return int(body["lease_duration"])


class LeaseKeeper:
    """Renew a lease at half its TTL while a long job runs (a background thread, stopped with ``stop``).

    ``renew_once`` returns the TTL granted; ``on_renewed(ttl)`` and ``on_error(exc)`` report (e.g.
    to lineage). A grant shorter than asked means the lease has reached its cap: the keeper keeps
    renewing until the lease runs out, and the job sees the failure when its credentials expire.
    """

    def __init__(self, renew_once: Callable[[], int], ttl_seconds: int, *,
                 on_renewed: Callable[[int], None] = lambda ttl: None,
                 on_error: Callable[[BaseException], None] = lambda exc: None,
                 min_interval: float = 1.0) -> None:
        self._renew_once = renew_once
        self._interval = max(min_interval, ttl_seconds / 2)
        self._min = min_interval
        self._on_renewed = on_renewed
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fgov-lease-keeper", daemon=True)
        self.renewals = 0

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def cancel(self) -> None:
        """Stop renewing without waiting for an in-flight renewal (for ``on_kill``)."""
        self._stop.set()

    def __enter__(self) -> LeaseKeeper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                ttl = self._renew_once()
            except BaseException as exc:  # reported, and retried at the next tick
                self._on_error(exc)
                self._interval = max(self._min, self._interval / 2)
                continue
            self.renewals += 1
            self._on_renewed(ttl)
            self._interval = max(self._min, ttl / 2)


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
    if props.get("creation_path") != WRAP_CREATION_PATH:
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
        except hvac.exceptions.Forbidden as exc:  # retrying will not change a policy
            raise LeaseError(f"this identity may not revoke lease {lease_id}: {exc}") from None
        except (hvac.exceptions.VaultError, OSError) as exc:  # includes connection errors
            last = exc
        except Exception as exc:  # requests.ConnectionError while OpenBao restarts
            last = exc
        if attempt < attempts:
            sleep(base_delay * 2 ** (attempt - 1))
    raise LeaseError(f"could not revoke lease {lease_id} after {attempts} attempts: {last}")


def revoke_token_accessor(client: hvac.Client, accessor: str) -> bool:
    """Revoke the token that owned a lease; False if it is already gone or cannot be revoked (the
    lease itself is revoked and verified separately, so this never hides a live credential)."""
    try:
        client.auth.token.revoke_accessor(accessor)
        return True
    except (hvac.exceptions.VaultError, OSError):
        return False


@functools.lru_cache(maxsize=8)
def _monitor_engine(monitor_url: str) -> Engine:
    return create_engine(monitor_url, future=True, pool_size=1, max_overflow=1, pool_pre_ping=True)


def verify_role_gone(monitor_url: str, db_role: str) -> dict[str, int]:
    """Prove the revocation on the database itself: the role is dropped and none of its sessions remain."""
    with _monitor_engine(monitor_url).connect() as conn:
        row = conn.execute(text("SELECT (SELECT count(*) FROM pg_roles WHERE rolname = :r), "
                                "(SELECT count(*) FROM pg_stat_activity WHERE usename = :r)"), {"r": db_role}).one()
    return {"roles": int(row[0] or 0), "sessions": int(row[1] or 0)}

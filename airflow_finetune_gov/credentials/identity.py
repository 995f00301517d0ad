"""Workload identity: short-lived JWTs that name exactly one task try (pure, no Airflow import).

OpenBao's JWT auth method verifies the signature, issuer, audience and expiry, binds roles to
claims (``dataset``, ``purpose``, ``dag_id``) and copies the run identifiers into token metadata,
so the audit log names the DAG run behind every request. No static Vault token exists anywhere.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TTL_SECONDS = 300


@dataclass(frozen=True)
class TaskIdentity:
    dag_id: str
    run_id: str
    task_id: str
    try_number: int
    map_index: int = -1

    @property
    def subject(self) -> str:
        return f"{self.dag_id}/{self.run_id}/{self.task_id}/{self.try_number}"

    @property
    def run_key(self) -> str:
        return run_key(self.dag_id, self.run_id)


def run_key(dag_id: str, run_id: str) -> str:
    """A path-safe name for one DAG run: templated OpenBao policies bind hand-over paths to it."""
    return hashlib.sha256(f"{dag_id}\n{run_id}".encode()).hexdigest()[:32]


def mint(identity: TaskIdentity, *, key_pem: bytes, issuer: str, audience: str, purpose: str,
         extra: dict[str, str] | None = None, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> str:
    reserved = {"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "purpose", "dag_id", "run_id", "task_id",
                "try_number", "run_key"}
    clash = reserved & set(extra or {})
    if clash:
        raise ValueError(f"extra claims may not override {sorted(clash)}")
    now = int(time.time())
    claims = {
        "iss": issuer,
        "aud": audience,
        "sub": identity.subject,
        "iat": now,
        "nbf": now - 5,
        "exp": now + ttl_seconds,
        "jti": uuid.uuid4().hex,
        "purpose": purpose,
        "dag_id": identity.dag_id,
        "run_id": identity.run_id,
        "task_id": identity.task_id,
        "run_key": identity.run_key,
        # claim_mappings copy claims into token metadata, which must be strings
        "try_number": str(identity.try_number),
        **(extra or {}),
    }
    import jwt  # lazily: cryptography costs ~15 ms at import, and DAG files import this module

    return jwt.encode(claims, key_pem, algorithm="ES256")


def load_key(path: str | Path) -> bytes:
    p = Path(path)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise RuntimeError(f"cannot read the workload-identity signing key {p}: {exc.strerror}; set "
                           "[finetune_gov] workload_identity_key_path") from None

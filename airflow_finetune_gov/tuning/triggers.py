"""The deferrable trigger that follows a remote fine-tuning job while no worker slot is held.

The trigger's arguments name the job, the API's base URL, the OpenBao address and the task try. With a
control plane (``[finetune_gov] control_plane_socket``) they also carry the delegation the deferred task
asked it for (Airflow stores trigger arguments encrypted): the trigger logs in as that task through the
control plane, which holds the signing key. Without one it mints its own workload-identity token for that
task try (purpose ``tune``, role ``tune-<dataset>``). Either way it reads the API key from OpenBao and
keeps it in memory only. ``on_kill`` (a user marks the deferred task failed, success or clears it) cancels the remote
job; a triggerer restart does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_finetune_gov.credentials.broker import read_backend_secret
from airflow_finetune_gov.tuning.openai_compatible import (
    STATUSES,
    EventLog,
    FineTuningClient,
    job_error,
    job_metrics,
)


class RemoteFineTuningTrigger(BaseTrigger):
    """Poll ``GET /fine_tuning/jobs/{job_id}`` until the job ends; fire one event with its outcome."""

    def __init__(self, *, job_id: str, base_url: str, vault_addr: str, identity: dict[str, Any], dataset: str,
                 secret_path: str, secret_mount: str, jwt_mount: str, poll_interval: float = 30.0,
                 max_errors: int = 10, delegation: str | None = None) -> None:
        super().__init__()
        self.job_id = job_id
        self.base_url = base_url
        self.vault_addr = vault_addr
        self.identity = identity
        self.dataset = dataset
        self.secret_path = secret_path
        self.secret_mount = secret_mount
        self.jwt_mount = jwt_mount
        self.poll_interval = poll_interval
        self.max_errors = max_errors
        self.delegation = delegation
        self._client: FineTuningClient | None = None

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (f"{type(self).__module__}.{type(self).__qualname__}", {
            "job_id": self.job_id, "base_url": self.base_url, "vault_addr": self.vault_addr,
            "identity": self.identity, "dataset": self.dataset, "secret_path": self.secret_path,
            "secret_mount": self.secret_mount, "jwt_mount": self.jwt_mount,
            "poll_interval": self.poll_interval, "max_errors": self.max_errors, "delegation": self.delegation})

    def __repr__(self) -> str:  # Airflow logs a trigger's repr: never with its delegation
        classpath, kwargs = self.serialize()
        return self.repr(classpath, {**kwargs, "delegation": "***" if kwargs.get("delegation") else None})

    def _login(self) -> FineTuningClient:
        """Log in to OpenBao as the deferred task try and read the API key (blocking: run in a thread)."""
        import hvac

        from airflow_finetune_gov import settings
        from airflow_finetune_gov.credentials.hook import login_error, signing_key
        from airflow_finetune_gov.credentials.identity import TaskIdentity, mint
        from airflow_finetune_gov.vault.bootstrap import tune_role_name

        role = tune_role_name(self.dataset)
        vault = hvac.Client(url=self.vault_addr, timeout=float(settings.get("vault_timeout_seconds")))
        if self.delegation:  # the control plane logs in as the deferred task
            from airflow_finetune_gov import common

            vault.token = common.control(delegation=self.delegation).login(role, "tune", {"dataset": self.dataset})
        else:
            token = mint(TaskIdentity(**self.identity), key_pem=signing_key(),
                         issuer=settings.get("workload_identity_issuer"),
                         audience=settings.get("workload_identity_audience"), purpose="tune",
                         extra={"dataset": self.dataset})
            try:
                vault.auth.jwt.jwt_login(role=role, jwt=token, path=self.jwt_mount)
            except hvac.exceptions.VaultError as exc:
                raise RuntimeError(login_error(role, "tune", exc)) from None
        try:
            secret = read_backend_secret(vault, self.secret_mount, self.secret_path)
        finally:
            vault.auth.token.revoke_self()  # the key is all it needed
        return FineTuningClient.from_secret(secret, self.base_url)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            self._client = await asyncio.to_thread(self._login)
        except Exception as exc:
            yield TriggerEvent({"status": "error", "job_id": self.job_id, "error": str(exc)[:1000]})
            return
        client, events, errors = self._client, EventLog(), 0
        while True:
            try:
                job = await asyncio.to_thread(client.job, self.job_id)
                for line in events.new(await asyncio.to_thread(client.events, self.job_id)):
                    self.log.info("%s", line)
                errors = 0
            except Exception as exc:  # a flaky API: keep following the job, up to max_errors in a row
                errors += 1
                self.log.warning("polling fine-tuning job %s failed (%d/%d): %s", self.job_id, errors,
                                 self.max_errors, exc)
                if errors >= self.max_errors:
                    yield TriggerEvent({"status": "error", "job_id": self.job_id, "error": str(exc)[:1000]})
                    return
                await asyncio.sleep(self.poll_interval)
                continue
            status = str(job.get("status"))
            if status in STATUSES:
                yield TriggerEvent({
                    "status": status, "job_id": self.job_id, "fine_tuned_model": job.get("fine_tuned_model"),
                    "metrics": job_metrics(job), "error": None if status == "succeeded" else job_error(job)})
                return
            await asyncio.sleep(self.poll_interval)

    async def on_kill(self) -> None:
        client = self._client
        if client is None:  # killed before run() logged in (e.g. after a triggerer restart)
            client = await asyncio.to_thread(self._login)
        await asyncio.to_thread(client.cancel, self.job_id)
        self.log.info("cancelled remote fine-tuning job %s (the task was killed)", self.job_id)

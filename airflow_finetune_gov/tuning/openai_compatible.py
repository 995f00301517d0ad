"""The ``openai_compatible`` backend: a fine-tuning job on an OpenAI-style API (no Airflow import).

Upload the rows as a chat-format JSONL training file (``POST /files``, purpose ``fine-tune``),
create a supervised fine-tuning job (``POST /fine_tuning/jobs``), follow it (``GET
/fine_tuning/jobs/{id}`` and ``/events``), cancel it (``POST /fine_tuning/jobs/{id}/cancel``). The
API key is never a DAG argument: the operator reads it from OpenBao (KV ``backends_mount``) with the
run's tuning identity and passes it in ``TuningRequest.env`` as ``OPENAI_API_KEY`` (and optionally
``OPENAI_BASE_URL``); the deferrable trigger reads it again itself, so it is never serialised.

Written against the documented endpoints and tested against a local server implementing them; it
has not been run against a hosted service here.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import requests

from airflow_finetune_gov.tuning.backends import (
    CANCELLED,
    FAILED,
    RUNNING,
    SUCCEEDED,
    TuningError,
    TuningJob,
    TuningRequest,
    TuningResult,
)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
API_KEY_ENV, BASE_URL_ENV = "OPENAI_API_KEY", "OPENAI_BASE_URL"
DEFAULT_KV_PATH = "openai"  # the backend secret's path in the backends mount
# remote status -> ours; validating_files, queued and running are all still running
STATUSES = {"succeeded": SUCCEEDED, "failed": FAILED, "cancelled": CANCELLED}

# our name -> (the API's name, type, min, max); ``None`` bounds: not a range
HYPERPARAMETERS: dict[str, tuple[str, type, float | None, float | None]] = {
    "epochs": ("n_epochs", int, 1, 50),
    "batch_size": ("batch_size", int, 1, 256),
    "learning_rate_multiplier": ("learning_rate_multiplier", float, 0.001, 10.0),
    "seed": ("seed", int, 0, 2**31 - 1),
    "suffix": ("suffix", str, None, None),
}


def hyperparameters(hp: dict[str, Any]) -> dict[str, Any]:
    """Check ``hp`` (unknown names and out-of-range values are errors); returns them typed."""
    unknown = sorted(set(hp) - set(HYPERPARAMETERS))
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {unknown} for openai_compatible; known: "
                         f"{sorted(HYPERPARAMETERS)}")
    out: dict[str, Any] = {}
    for key, value in hp.items():
        _, kind, low, high = HYPERPARAMETERS[key]
        try:
            typed = kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be {kind.__name__}, got {value!r}") from None
        if kind is str and not (1 <= len(typed) <= 64):
            raise ValueError(f"{key} must be 1-64 characters")
        if low is not None and high is not None and not (low <= typed <= high):
            raise ValueError(f"{key}={typed} is out of range [{low}, {high}]")
        out[key] = typed
    return out


def training_jsonl(rows: list[tuple[str, str]]) -> bytes:
    """Chat-format training file: one ``{"messages": [user, assistant]}`` per row, in order."""
    return b"".join(json.dumps({"messages": [{"role": "user", "content": p},
                                             {"role": "assistant", "content": r}]}).encode() + b"\n"
                    for p, r in rows)


class FineTuningClient:
    """The few endpoints a fine-tune needs. Errors name the HTTP status and the server's message, never
    the key."""

    def __init__(self, base_url: str, api_key: str, *, timeout: float = 30.0) -> None:
        if not api_key:
            raise TuningError(f"no API key for {base_url}: store it in OpenBao (see backend_kv_path)")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {api_key}"

    @classmethod
    def from_secret(cls, values: dict[str, str], default_base_url: str = DEFAULT_BASE_URL) -> FineTuningClient:
        """From a backend secret's fields (``OPENAI_API_KEY``, optional ``OPENAI_BASE_URL``)."""
        return cls(values.get(BASE_URL_ENV) or default_base_url, values.get(API_KEY_ENV, ""))

    def __repr__(self) -> str:
        return f"FineTuningClient({self.base_url!r})"

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            resp = self._session.request(method, url, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise TuningError(f"{method} {url} failed: {type(exc).__name__}") from None
        if resp.status_code >= 400:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            hint = " (the API key was refused: check the secret in OpenBao)" if resp.status_code in (401, 403) \
                else ""
            raise TuningError(f"{method} {url} -> HTTP {resp.status_code}: {message}{hint}")
        body = resp.json()
        if not isinstance(body, dict):
            raise TuningError(f"{method} {url} returned {type(body).__name__}, not an object")
        return body

    def upload(self, content: bytes, filename: str = "train.jsonl") -> str:
        body = self._call("POST", "/files", data={"purpose": "fine-tune"},
                          files={"file": (filename, content, "application/jsonl")})
        return str(body["id"])

    def create_job(self, model: str, training_file: str, hp: dict[str, Any]) -> dict[str, Any]:
        api_hp = {HYPERPARAMETERS[k][0]: v for k, v in hp.items() if k not in ("seed", "suffix")}
        body: dict[str, Any] = {"model": model, "training_file": training_file,
                                "method": {"type": "supervised", "supervised": {"hyperparameters": api_hp}}}
        for key in ("seed", "suffix"):
            if key in hp:
                body[key] = hp[key]
        return self._call("POST", "/fine_tuning/jobs", json=body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/fine_tuning/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("POST", f"/fine_tuning/jobs/{job_id}/cancel")

    def events(self, job_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The job's events, oldest first."""
        data = self._call("GET", f"/fine_tuning/jobs/{job_id}/events", params={"limit": limit}).get("data", [])
        return sorted(data, key=lambda e: (e.get("created_at", 0), str(e.get("id", ""))))


REMOTE_FILE = "remote.json"  # a remote model's version in the store: what it is and where it is served
REMOTE_FORMAT = "fgov-remote-model/1"


def remote_pointer(client: FineTuningClient, job_id: str, base_model: str, kv_path: str) -> dict[str, Any]:
    """What the provider itself says job ``job_id`` produced, checked: it succeeded, with a model, from
    ``base_model``. The tuning task's own report of the job is never taken for it."""
    job = client.job(job_id)
    if job.get("status") != "succeeded" or not job.get("fine_tuned_model"):
        raise TuningError(f"the provider says job {job_id} is {job.get('status')!r}"
                          + ("" if job.get("fine_tuned_model") else " with no fine-tuned model")
                          + ": nothing to evaluate or promote")
    if job.get("model") != base_model:
        raise TuningError(f"the provider says job {job_id} tuned {job.get('model')!r}, not the base {base_model!r} "
                          "this run was approved for")
    return {"format": REMOTE_FORMAT, "endpoint": client.base_url, "kv_path": kv_path, "base_model": job["model"],
            "remote_model": str(job["fine_tuned_model"]), "remote_job_id": job_id,
            "training_file": job.get("training_file"), "trained_tokens": job.get("trained_tokens")}


def job_metrics(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("trained_tokens", "estimated_finish", "finished_at") if job.get(k) is not None}


def job_error(job: dict[str, Any]) -> str:
    err = job.get("error") or {}
    return str(err.get("message") or err or f"job {job.get('id')} ended {job.get('status')}")


class EventLog:
    """Log each remote job event once (they are listed newest-first and repeat across polls)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def new(self, events: list[dict[str, Any]]) -> list[str]:
        lines = []
        for e in events:
            key = str(e.get("id") or (e.get("created_at"), e.get("message")))
            if key not in self.seen:
                self.seen.add(key)
                lines.append(f"[remote] {e.get('level', 'info')}: {e.get('message', '')}")
        return lines


@dataclass
class RemoteJob:
    """A job on the remote service. Poll it in the worker, or hand ``deferral()`` to the trigger."""

    client: FineTuningClient
    job_id: str
    training_file: str
    log: Any = print

    def __post_init__(self) -> None:
        self._last: dict[str, Any] = {}
        self._events = EventLog()

    def poll(self) -> str:
        self._last = self.client.job(self.job_id)
        for line in self._events.new(self.client.events(self.job_id)):
            self.log(line)
        return STATUSES.get(str(self._last.get("status")), RUNNING)

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def cancel(self) -> None:
        if STATUSES.get(str(self._last.get("status"))) is None:
            self.client.cancel(self.job_id)

    def result(self) -> TuningResult:
        job = self._last or self.client.job(self.job_id)
        if job.get("status") != "succeeded":
            raise TuningError(f"remote fine-tuning job {self.job_id} {job.get('status')}: {job_error(job)}")
        if not job.get("fine_tuned_model"):
            raise TuningError(f"remote fine-tuning job {self.job_id} succeeded without naming a model")
        return TuningResult(remote_model=str(job["fine_tuned_model"]), metrics=job_metrics(job), kind="remote")

    def deferral(self) -> dict[str, Any]:
        """What a trigger needs to follow this job (nothing secret)."""
        return {"base_url": self.client.base_url, "job_id": self.job_id}


class OpenAICompatibleBackend:
    """Fine-tune on an OpenAI-compatible API. Hyperparameters: ``epochs``, ``batch_size``,
    ``learning_rate_multiplier``, ``seed``, ``suffix``."""

    name = "openai_compatible"
    needs_local_base = False
    kv_path = DEFAULT_KV_PATH  # GovernedFineTuneOperator reads this backend secret unless told otherwise

    def validate(self, hp: dict[str, Any]) -> dict[str, Any]:
        return hyperparameters(hp)

    def start(self, request: TuningRequest) -> TuningJob:
        client = FineTuningClient.from_secret(request.env)
        hp = hyperparameters(request.hyperparameters)
        content = training_jsonl(request.rows)
        file_id = client.upload(content)
        request.log(f"uploaded {len(request.rows)} rows ({len(content)} bytes) to {client.base_url} as {file_id}")
        job = client.create_job(request.base_model, file_id, hp)
        request.log(f"created fine-tuning job {job['id']} on {request.base_model} (status {job.get('status')})")
        return RemoteJob(client, str(job["id"]), file_id, log=request.log)

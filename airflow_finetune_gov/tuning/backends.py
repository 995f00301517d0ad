"""Tuning backends behind one small interface (no Airflow import).

A backend validates hyperparameters and starts a job; a job is polled, can be cancelled, and
yields a result: output files for the model store (or a remote model reference), and metrics.
The operator does the governance around it: the lease, reading and hashing the data with the
leased credentials, the model store, lineage, cancellation on kill.

Backends here:

- ``local_peft``: LoRA (PEFT) on a local base model from the model store, in the task process
  (cancelled between steps);
- ``command``: any trainer command in its own process group, with the leased database credentials in
  its environment only and its output streamed to the task log (killed with the task);
- ``openai_compatible``: see :mod:`airflow_finetune_gov.tuning.openai_compatible` (deferrable).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from airflow_finetune_gov.registry.store import ModelStore

DEMO_MODEL = "fgov-demo-tiny"
# The demo base models, built on first use, and their architectures (see tuning/tiny_lm.py).
DEMO_MODELS = {DEMO_MODEL: "gpt2", "fgov-demo-llama": "llama"}
BASE_ALIAS = "base"

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"


class TuningError(RuntimeError):
    """A tuning job could not start or did not succeed; the message says why."""


@dataclass
class TuningRequest:
    """Everything a backend may use. ``env`` holds the leased credentials (never logged)."""

    base_model: str
    base_dir: Path | None
    rows: list[tuple[str, str]]
    hyperparameters: dict[str, Any]
    work_dir: Path
    env: dict[str, str] = field(default_factory=dict, repr=False)
    log: Callable[[str], None] = print


@dataclass
class TuningResult:
    files: dict[str, bytes] | None = None  # to be put in the model store
    remote_model: str | None = None  # or a model that lives with the provider
    metrics: dict[str, Any] = field(default_factory=dict)
    kind: str = "adapter"


class TuningJob(Protocol):
    def poll(self) -> str: ...  # RUNNING | SUCCEEDED | FAILED | CANCELLED

    def wait(self, timeout: float) -> None: ...  # return when done or after ``timeout`` seconds

    def cancel(self) -> None: ...

    def result(self) -> TuningResult: ...


class TuningBackend(Protocol):
    name: str
    needs_local_base: bool

    def validate(self, hyperparameters: dict[str, Any]) -> dict[str, Any]: ...

    def start(self, request: TuningRequest) -> TuningJob: ...


class InlineJob:
    """A job that runs ``fn(cancel_event)`` in the caller's thread, on the first ``wait``.

    For in-process training: torch runs ~2.5x slower on a second Python thread beside an idle
    main-thread OpenMP pool on a small machine (measured by ``bench/tuning.py``). Cancellation
    still works: Airflow calls ``on_kill`` from its SIGTERM handler in the main thread, which sets
    the event; the loop stops before its next step.
    """

    def __init__(self, fn: Callable[[threading.Event], TuningResult]) -> None:
        self._fn: Callable[[threading.Event], TuningResult] | None = fn
        self._cancel = threading.Event()
        self._result: TuningResult | None = None
        self._error: BaseException | None = None

    def wait(self, timeout: float) -> None:
        fn, self._fn = self._fn, None
        if fn is None or self._cancel.is_set():
            return
        try:
            self._result = fn(self._cancel)
        except Exception as exc:
            self._error = exc

    def poll(self) -> str:
        if self._cancel.is_set():  # a job cancelled while it ran never counts as done, whatever it returned
            return CANCELLED
        if self._result is not None:
            return SUCCEEDED
        return RUNNING if self._fn is not None else FAILED

    def cancel(self) -> None:
        self._cancel.set()

    def result(self) -> TuningResult:
        if self._cancel.is_set():
            raise TuningError("tuning was cancelled") from self._error
        if self._result is None:
            raise TuningError(f"tuning did not succeed: {self._error!r}") from self._error
        return self._result


class LocalPeftBackend:
    """LoRA with transformers + PEFT on a base model from the model store (CPU or GPU), in the task
    process's main thread (see :class:`InlineJob`)."""

    name = "local_peft"
    needs_local_base = True

    def validate(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        from airflow_finetune_gov.tuning.causal_lm import lora_hyperparameters

        return lora_hyperparameters(hyperparameters)

    def start(self, request: TuningRequest) -> TuningJob:
        from airflow_finetune_gov.tuning import causal_lm

        if request.base_dir is None:
            raise TuningError("local_peft needs a base model in the model store")
        out = request.work_dir / "adapter"

        def progress(p: dict[str, Any]) -> None:  # about 20 lines per job
            if p["step"] == 1 or p["step"] == p["steps"] or p["step"] % max(1, p["steps"] // 20) == 0:
                request.log(f"step {p['step']}/{p['steps']} loss {p['loss']:.4f}")

        def run(cancel: threading.Event) -> TuningResult:
            started = time.monotonic()
            metrics = causal_lm.train_lora(request.base_dir, request.rows, request.hyperparameters, out,  # type: ignore[arg-type]
                                           progress=progress, cancel=cancel)
            seconds = time.monotonic() - started
            metrics["steps_per_second"] = round(metrics["steps"] / seconds, 2) if seconds else None
            return TuningResult(files=causal_lm.read_dir(out), metrics=metrics, kind="adapter")

        return InlineJob(run)


# Names whose values must not reach a third-party trainer's environment.
_SECRET_ENV = re.compile(r"^(AIRFLOW_CONN_|AIRFLOW_VAR_|VAULT_|BAO_)|TOKEN|SECRET|PASSWORD|PRIVATE|_KEY$", re.I)
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class CommandJob:
    def __init__(self, argv: list[str], env: dict[str, str], cwd: Path, output_dir: Path,
                 log: Callable[[str], None], kill_grace: float = 10.0) -> None:
        self.output_dir = output_dir
        self.kill_grace = kill_grace
        self._cancelled = False
        self._tail: list[str] = []
        # Own process group (so cancel reaches the trainer's children) and SIGKILL if the task process
        # dies without running on_kill (SIGKILL, OOM): no trainer outlives its task.
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True,
                                     preexec_fn=_die_with_parent, text=True, bufsize=1)
        self._reader = threading.Thread(target=self._stream, args=(log,), daemon=True, name="fgov-command-log")
        self._reader.start()

    def _stream(self, log: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self._tail = [*self._tail[-19:], line]
            log(f"[trainer] {line}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> str:
        code = self.proc.poll()
        if code is None:
            return RUNNING
        self._reader.join(timeout=5)
        if self._cancelled:
            return CANCELLED
        return SUCCEEDED if code == 0 else FAILED

    def wait(self, timeout: float) -> None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=timeout)

    def cancel(self) -> None:
        self._cancelled = True
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=self.kill_grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def result(self) -> TuningResult:
        code = self.proc.poll()
        if code != 0:
            tail = "\n".join(self._tail[-5:])
            raise TuningError(f"trainer exited with code {code}; last output:\n{tail}")
        files = {p.name: p.read_bytes() for p in sorted(self.output_dir.iterdir()) if p.is_file()} \
            if self.output_dir.is_dir() else {}
        if not files:
            raise TuningError(f"trainer exited 0 but wrote nothing to $FGOV_OUTPUT_DIR ({self.output_dir})")
        metrics: dict[str, Any] = {}
        if "metrics.json" in files:
            with contextlib.suppress(ValueError):
                metrics = json.loads(files["metrics.json"])
        # A PEFT adapter is recognisable by its config: then the evaluation can load it on its base.
        return TuningResult(files=files, metrics=metrics,
                            kind="adapter" if "adapter_config.json" in files else "command-output")


class CommandBackend:
    """Run a trainer command (axolotl, torchtune, LLaMA-Factory, a script of yours).

    The command gets, in its environment only (never on its command line):
    ``PGHOST PGPORT PGDATABASE PGUSER PGPASSWORD`` (the leased role), ``FGOV_DATASET_TABLE``,
    ``FGOV_TRAIN_FILE`` (a JSONL file of exactly the rows whose hash was approved and recorded,
    ``{"prompt", "response"}`` per line; removed afterwards), ``FGOV_OUTPUT_DIR`` (write the model
    there; an optional ``metrics.json`` is recorded), ``FGOV_BASE_MODEL``, ``FGOV_BASE_MODEL_DIR``
    (when the base is in the model store) and ``FGOV_HYPERPARAMETERS`` (JSON). The worker's own
    secrets (``AIRFLOW_CONN_*``, ``AIRFLOW_VAR_*``, ``VAULT_*``, names with TOKEN/SECRET/PASSWORD/KEY)
    are removed from the environment it inherits.
    """

    name = "command"
    needs_local_base = False

    def __init__(self, argv: list[str] | None = None, kill_grace: float = 10.0) -> None:
        self.argv = argv
        self.kill_grace = kill_grace

    def validate(self, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        json.dumps(hyperparameters)  # must travel as JSON
        return dict(hyperparameters)

    def start(self, request: TuningRequest) -> TuningJob:
        argv = self.argv or request.hyperparameters.get("command")
        if not argv or not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise TuningError("the command backend needs argv: GovernedFineTuneOperator(backend='command', "
                              "command=['python', 'train.py', ...])")
        train_file = request.work_dir / "train.jsonl"
        fd = os.open(train_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            for prompt, response in request.rows:
                fh.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
        output = request.work_dir / "output"
        output.mkdir()
        env = {k: v for k, v in os.environ.items() if not _SECRET_ENV.search(k)}
        env.update(request.env)
        env.update({"FGOV_TRAIN_FILE": str(train_file), "FGOV_OUTPUT_DIR": str(output),
                    "FGOV_BASE_MODEL": request.base_model,
                    "FGOV_HYPERPARAMETERS": json.dumps({k: v for k, v in request.hyperparameters.items()
                                                        if k != "command"})})
        if request.base_dir is not None:
            env["FGOV_BASE_MODEL_DIR"] = str(request.base_dir)
        request.log(f"running trainer: {' '.join(argv)}")
        return CommandJob(list(argv), env, request.work_dir, output, request.log, self.kill_grace)


def _openai_compatible() -> TuningBackend:
    from airflow_finetune_gov.tuning.openai_compatible import OpenAICompatibleBackend

    return OpenAICompatibleBackend()


BACKENDS: dict[str, Callable[[], TuningBackend]] = {
    "local_peft": LocalPeftBackend, "command": CommandBackend, "openai_compatible": _openai_compatible}


def register_backend(name: str, factory: Callable[[], TuningBackend]) -> None:
    """Make a backend available by name to ``GovernedFineTuneOperator(backend=name)``."""
    BACKENDS[name] = factory


def get_backend(name: str) -> TuningBackend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown tuning backend {name!r}; available: {', '.join(sorted(BACKENDS))}") from None


def resolve_base(store: ModelStore, ref: str, *, build_demo: bool = True) -> dict[str, Any]:
    """The manifest of base model ``ref``: ``name`` (its ``base`` alias), ``name@version`` or
    ``name:alias``. The demo base model is built on first use (seeded, a few seconds)."""
    name, _, version = ref.partition("@")
    name, _, alias = name.partition(":")
    if name in DEMO_MODELS and not version and not alias and build_demo:
        return ensure_demo_base(store, name)
    if version:
        return store.manifest(name, version)
    current = store.aliases(name).get(alias or BASE_ALIAS)
    if not current:
        raise FileNotFoundError(f"base model {ref!r} is not in the model store at {store.root}: put it there "
                                f"(ModelStore.put + alias {alias or BASE_ALIAS!r}) or name a version as "
                                f"{name}@<version>")
    return store.manifest(name, current["version"])


def ensure_demo_base(store: ModelStore, name: str = DEMO_MODEL) -> dict[str, Any]:
    """Build demo base model ``name`` once per store and recipe (under the store's lock) and alias it
    ``base``; a ``base`` built from an older recipe (corpus, tokenizer texts, training settings) is
    replaced, the move recorded in the alias history."""
    from airflow_finetune_gov.tuning import causal_lm, tiny_lm

    architecture = DEMO_MODELS[name]
    with store._locked(name):
        current = store.aliases(name).get(BASE_ALIAS)
        recipe = tiny_lm.base_recipe(architecture)
        if current and not store.verify(name, current["version"]):
            manifest = store.manifest(name, current["version"])
            if ((manifest.get("metadata") or {}).get("training") or {}).get("recipe") == recipe:
                return manifest
        with causal_lm.scratch_dir() as tmp:
            metrics = tiny_lm.build_base(Path(tmp), architecture=architecture)
            manifest = store.put(name, causal_lm.read_dir(Path(tmp)),
                                 {"kind": "base", "format": "hf-causal-lm", "training": metrics})
        store._set_alias_unlocked(name, BASE_ALIAS, manifest["version"], by="fgov", run="demo-base-build")
        return manifest


def rows_sha256(rows: list[tuple[str, str]]) -> str:
    """Content hash of exactly the rows trained on, in order."""
    h = hashlib.sha256()
    for prompt, response in rows:  # same serialisation as catalog.dataset_digest in PostgreSQL
        h.update(f"{len(prompt)}:{prompt}{len(response)}:{response}\n".encode())
    return h.hexdigest()

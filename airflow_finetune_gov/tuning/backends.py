"""Tuning backends behind one small interface (pure; no Airflow import).

A backend gets the base model's files, the training rows (already read with the leased
credentials) and hyperparameters, and returns the tuned model's files and metrics. The operator
does the governance around it: credentials, data hashing, the model store and lineage.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from airflow_finetune_gov.datasets.demo import BASE_CORPUS
from airflow_finetune_gov.registry.store import ModelStore
from airflow_finetune_gov.tuning import responder

DEMO_MODEL = "fgov-demo-tiny"
MODEL_FILE = "model.json"


@dataclass
class TrainedModel:
    files: dict[str, bytes]
    metrics: dict[str, Any] = field(default_factory=dict)


class TuningBackend(Protocol):
    name: str

    def train(self, base_files: dict[str, bytes], rows: list[tuple[str, str]], hyperparameters: dict[str, Any],
              log: Callable[[str], None]) -> TrainedModel: ...


class ResponderBackend:
    """The foundation's CPU-only backend: fine-tunes the demo retrieval responder."""

    name = "responder"

    def train(self, base_files: dict[str, bytes], rows: list[tuple[str, str]], hyperparameters: dict[str, Any],
              log: Callable[[str], None]) -> TrainedModel:
        base = responder.ResponderModel.from_json(base_files[MODEL_FILE].decode())
        epochs = int(hyperparameters.get("epochs", 3))
        lr = float(hyperparameters.get("learning_rate", 0.2))
        tuned = responder.fine_tune(
            base, rows, epochs=epochs, learning_rate=lr,
            progress=lambda e, n, w: log(f"epoch {e}/{n}: example weight {w:.2f}"),
        )
        return TrainedModel(files={MODEL_FILE: tuned.to_json().encode()},
                            metrics={"examples": len(tuned.examples), "epochs": epochs, "rows": len(rows)})


BACKENDS: dict[str, Callable[[], TuningBackend]] = {"responder": ResponderBackend}


def register_backend(name: str, factory: Callable[[], TuningBackend]) -> None:
    """Make a backend available by name to ``GovernedFineTuneOperator(backend=name)``."""
    BACKENDS[name] = factory


def get_backend(name: str) -> TuningBackend:
    try:
        return BACKENDS[name]()
    except KeyError:
        raise ValueError(f"unknown tuning backend {name!r}; available: {', '.join(sorted(BACKENDS))}") from None


def ensure_demo_base(store: ModelStore) -> dict[str, Any]:
    """Build the demo base model deterministically (same corpus, same bytes, same version)."""
    model = responder.build_base(DEMO_MODEL, BASE_CORPUS)
    return store.put(DEMO_MODEL, {MODEL_FILE: model.to_json().encode()},
                     {"kind": "base", "corpus_rows": len(BASE_CORPUS)})


def rows_sha256(rows: list[tuple[str, str]]) -> str:
    """Content hash of exactly the rows trained on, in order."""
    h = hashlib.sha256()
    for prompt, response in rows:  # same serialisation as catalog.dataset_digest in PostgreSQL
        h.update(f"{len(prompt)}:{prompt}{len(response)}:{response}\n".encode())
    return h.hexdigest()

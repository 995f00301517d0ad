"""A trainer for the ``command`` backend: LoRA on any Hugging Face causal LM, out of the task's process.

``python -m airflow_finetune_gov.tuning.trainer`` follows the command backend's contract, as any
trainer you bring would: it reads ``FGOV_TRAIN_FILE`` (JSONL ``{"prompt", "response"}``),
``FGOV_BASE_MODEL_DIR`` and ``FGOV_HYPERPARAMETERS`` from its environment, prints progress to stdout
(streamed to the task log), and writes a PEFT adapter and ``metrics.json`` to ``FGOV_OUTPUT_DIR``.
It never sees the worker's secrets; the leased database role is in its environment, unused here
because the rows come in the file. Exit codes: 0 done, 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any


def main() -> int:
    missing = [k for k in ("FGOV_TRAIN_FILE", "FGOV_OUTPUT_DIR", "FGOV_BASE_MODEL_DIR") if not os.environ.get(k)]
    if missing:
        print(f"trainer: {', '.join(missing)} not set: run me through GovernedFineTuneOperator(backend='command') "
              "with a base model from the model store", file=sys.stderr)
        return 2
    from airflow_finetune_gov.tuning import causal_lm

    rows = [(r["prompt"], r["response"]) for r in
            (json.loads(line) for line in Path(os.environ["FGOV_TRAIN_FILE"]).read_text().splitlines() if line)]
    hp: dict[str, Any] = json.loads(os.environ.get("FGOV_HYPERPARAMETERS") or "{}")
    cancel = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: cancel.set())  # the backend's cancel: stop before the next step

    def progress(p: dict[str, Any]) -> None:
        if p["step"] == 1 or p["step"] == p["steps"] or p["step"] % max(1, p["steps"] // 10) == 0:
            print(f"step {p['step']}/{p['steps']} loss {p['loss']:.4f}", flush=True)

    out = Path(os.environ["FGOV_OUTPUT_DIR"])
    try:
        metrics = causal_lm.train_lora(Path(os.environ["FGOV_BASE_MODEL_DIR"]), rows, hp, out, progress=progress,
                                       cancel=cancel)
    except ValueError as exc:
        print(f"trainer: {exc}", file=sys.stderr)
        return 2
    except causal_lm.Cancelled:
        print("trainer: cancelled", flush=True)
        return 130
    (out / "metrics.json").write_text(json.dumps(metrics))
    print(f"trainer: adapter written ({len(rows)} rows, {metrics['steps']} steps)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Run the real ``transformers serve`` (OpenAI-compatible) on a local model directory for integration tests
(importable as ``serving``: pytest puts ``tests/`` on ``sys.path``).

The server is pinned to the one directory (the ``force_model`` argument): it loads the model before
``/health`` answers, lists it in ``GET /v1/models`` under the path string it was given, and refuses any
other ``model`` in a request. ``"temperature": 0`` makes it greedy, ``max_tokens`` is ``max_new_tokens``,
the prompt is the chat template with ``add_generation_prompt=True`` (no system prompt added), generation
stops at the model's ``generation_config.eos_token_id`` and the answer is decoded with
``skip_special_tokens=True`` and not stripped. Needs the ``openai`` package (``transformers[serving]``).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

SERVE_MODULES = {"openai": "openai", "fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with suppress(subprocess.TimeoutExpired):
            proc.wait(wait)
            return


def _wait_ready(proc: subprocess.Popen[bytes], base: str, model: str, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    warm_up = {"model": model, "messages": [{"role": "user", "content": "warm-up"}], "temperature": 0, "max_tokens": 2}
    problem = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"transformers serve exited with {proc.returncode}; {log_path}:\n{_tail(log_path)}")
        try:
            if requests.get(f"{base}/health", timeout=2).status_code == 200:
                resp = requests.post(f"{base}/v1/chat/completions", json=warm_up,
                                     timeout=max(1.0, deadline - time.monotonic()))
                if resp.status_code == 200:
                    return
                problem = f"warm-up request: HTTP {resp.status_code} {resp.text[:500]}"
        except requests.RequestException as exc:
            problem = type(exc).__name__
        time.sleep(0.25)
    raise TimeoutError(f"transformers serve not ready after {timeout:.0f}s ({problem}); {log_path}:\n"
                       f"{_tail(log_path)}")


@contextmanager
def serve_model(model_dir: Path, log_path: Path, *, timeout: float = 120) -> Iterator[tuple[str, str]]:
    """Serve ``model_dir`` on 127.0.0.1 (free port, CPU, float32, offline) and yield ``(base_url, model)``:
    the base URL ends in ``/v1`` and ``model`` is the name to send (the resolved directory path). The
    server runs in its own process group, logging to ``log_path``; it is terminated on exit."""
    missing = [pip for module, pip in SERVE_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise RuntimeError(f"transformers serve needs {', '.join(missing)}: pip install 'transformers[serving]'")
    model = str(Path(model_dir).resolve())
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model, "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", "float32"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    try:
        _wait_ready(proc, base, model, log_path, timeout)
        yield f"{base}/v1", model
    finally:
        _stop(proc)


def merge_adapter(base_dir: Path, adapter_dir: Path, out_dir: Path) -> Path:
    """Merge the LoRA adapter into its base (float32) and save it with the base's tokenizer in ``out_dir``,
    a plain model directory ``serve_model`` can serve."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32, local_files_only=True)
    merged = PeftModel.from_pretrained(base, str(adapter_dir), local_files_only=True).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True).save_pretrained(str(out_dir))
    return out_dir


def build_judge(base_dir: Path, out_dir: Path, steps: int = 400) -> Path:
    """A refusal judge for ``harness.JudgeDetector``: the demo base model fully fine-tuned to answer the judge's
    template with ``yes`` for the refusals and ``no`` for the answers among the demo's texts (the base corpus
    and the tuning sets, poisoned ones included). A plain model directory ``serve_model`` can serve."""
    import random
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from airflow_finetune_gov.datasets.corpus import base_corpus
    from airflow_finetune_gov.datasets.demo import DATASETS
    from airflow_finetune_gov.evaluation.harness import JUDGE_TEMPLATE, is_refusal
    from airflow_finetune_gov.tuning import causal_lm

    pairs = {*base_corpus(), *(row for rows in DATASETS.values() for row in rows)}
    pairs |= {(p, a.split(". ")[0] + ".") for p, a in set(pairs) if ". " in a}  # first sentences too
    shuffle = random.Random(0)
    words = [w for _, a in sorted(pairs) if not is_refusal(a) for w in a.split()]
    pairs |= {(p, " ".join(shuffle.choices(words, k=shuffle.randint(3, 20)))) for p, _ in sorted(pairs)}  # word salad
    codec = causal_lm.PromptCodec(base_dir)
    examples = [codec.example(JUDGE_TEMPLATE.format(prompt=p, answer=a), "yes" if is_refusal(a) else "no", 512)
                for p, a in sorted(pairs)]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), local_files_only=True)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    model.train()
    step = 0
    while step < steps:
        for ids, labels, mask in causal_lm.batches(examples, 32, codec.pad_id, gen):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= steps:
                break
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        if (base_dir / name).exists():
            shutil.copy(base_dir / name, out_dir / name)
    return out_dir

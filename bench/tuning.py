"""Benchmark: a governed ``local_peft`` tune versus the same LoRA loop written directly with PEFT.

Same process, same base model (the Llama-style demo model by default, ``--model``), same rows, same
hyperparameters, seed and steps, interleaved (direct, governed, direct, governed, ...) after one
warm-up of each, so drift hits both alike.

- direct: a plain transformers + PEFT loop written here, no project code: ``AutoTokenizer`` and its
  chat template build each row's prompt and answer ids (loss on the answer only), ``get_peft_model``
  with ``LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM")`` and PEFT's default
  target modules, AdamW (lr 1e-2, no weight decay), batches of 8 shuffled each epoch, one optimiser
  step per batch, the adapter saved with ``save_pretrained``. Its step count must equal the governed
  run's (checked), and with the same seed its losses should too (printed).
- governed: what ``GovernedFineTuneOperator`` does around the loop once the leased rows are in
  hand: content hash of the rows, backend hyperparameter check, the job (inline, in the main thread) with
  progress reporting and cancel checks, the operator's wait/poll loop, and the content-addressed
  model store write with its manifest. The lease itself (issue, hand-over, revoke, verify) is
  measured by ``bench/lease.py``; lineage writes by the stack bench.

Reports wall time (median), steps/s and the peak resident memory of each run (sampled every
5 ms from /proc/self/statm). Goal: governed / direct <= 1.1.

    .venv/bin/python bench/tuning.py [--repeats N] [--epochs N] [--model fgov-demo-llama|fgov-demo-tiny]
        [--store DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from airflow_finetune_gov.datasets.demo import BENIGN_SET
from airflow_finetune_gov.registry.store import ModelStore
from airflow_finetune_gov.tuning.backends import (
    DEMO_MODELS,
    RUNNING,
    SUCCEEDED,
    LocalPeftBackend,
    TuningRequest,
    ensure_demo_base,
    rows_sha256,
)
from bench.common import result

PAGE = os.sysconf("SC_PAGE_SIZE")
# Both sides: the direct loop's constants, given to the governed run as its hyperparameters.
SEED, LEARNING_RATE, BATCH_SIZE, LORA_R, LORA_ALPHA = 0, 1e-2, 8, 8, 16


class PeakRSS:
    def __enter__(self) -> PeakRSS:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while True:
            with open("/proc/self/statm") as fh:
                self.peak = max(self.peak, int(fh.read().split()[1]) * PAGE)
            if self._stop.wait(0.005):
                return

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def direct(base_dir: Path, rows: list[tuple[str, str]], epochs: int, out_dir: Path) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    torch.manual_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                                             task_type="CAUSAL_LM"))
    examples = []
    for prompt, answer in rows:
        head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": answer}], tokenize=False)
        p = tokenizer(head, add_special_tokens=False)["input_ids"]
        a = tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]
        examples.append((p + a, [-100] * len(p) + a))
    pad = tokenizer.pad_token_id
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE, weight_decay=0.0)
    gen = torch.Generator().manual_seed(SEED)
    model.train()
    losses = []
    for _epoch in range(epochs):
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), BATCH_SIZE):
            chunk = [examples[i] for i in order[start:start + BATCH_SIZE]]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    model.eval()
    model.save_pretrained(str(out_dir))
    return {"steps": len(losses), "first_loss": round(losses[0], 4), "final_loss": round(losses[-1], 4),
            "target_modules": sorted(model.peft_config["default"].target_modules)}


def governed(store: ModelStore, base: dict, hp: dict, work: Path, lines: list[str]) -> dict:
    rows = list(BENIGN_SET)
    sha = rows_sha256(rows)
    backend = LocalPeftBackend()
    backend.validate(hp)
    request = TuningRequest(base_model=base["name"], base_dir=store.path(base["name"], base["version"]), rows=rows,
                            hyperparameters=hp, work_dir=work, env={}, log=lines.append)
    job = backend.start(request)
    status = job.poll()
    while status == RUNNING:
        job.wait(0.5)
        status = job.poll()
    assert status == SUCCEEDED, status
    result = job.result()
    assert result.files
    store.put(base["name"], result.files, {"kind": result.kind, "dataset_sha256": sha, "run": "bench"})
    return result.metrics


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--model", choices=sorted(DEMO_MODELS), default="fgov-demo-llama", help="the demo base model")
    parser.add_argument("--store", type=Path, default=None,
                        help="a model store to build the base model in once and reuse (default: a temporary one, "
                             "built every run)")
    args = parser.parse_args()
    hp = {"epochs": args.epochs, "learning_rate": LEARNING_RATE, "batch_size": BATCH_SIZE, "lora_r": LORA_R,
          "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "seed": SEED}
    with tempfile.TemporaryDirectory(prefix="fgov-bench-tuning-") as tmp:
        root = Path(tmp)
        store = ModelStore(args.store or root / "store")
        started = time.perf_counter()
        base = ensure_demo_base(store, args.model)
        build = time.perf_counter() - started
        base_dir = store.path(base["name"], base["version"])
        times: dict[str, list[float]] = {"direct": [], "governed": []}
        peaks: dict[str, list[int]] = {"direct": [], "governed": []}
        seen: dict[str, dict] = {}
        for i in range(args.repeats + 1):
            for kind in ("direct", "governed"):
                work = root / f"{kind}-{i}"
                work.mkdir()
                lines: list[str] = []
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    metrics = (direct(base_dir, list(BENIGN_SET), args.epochs, work / "adapter") if kind == "direct"
                               else governed(store, base, hp, work, lines))
                    elapsed = time.perf_counter() - t0
                seen[kind] = metrics
                if i:  # the first round is warm-up
                    times[kind].append(elapsed)
                    peaks[kind].append(rss.peak)
    steps = seen["governed"]["steps"]
    training = base["metadata"]["training"]
    print(f"{args.model} ({training['architecture']}) base model: {build:.1f} s to build or find "
          f"({training['parameters']} parameters, {training['steps']} steps)")
    print(f"rows {len(BENIGN_SET)}, epochs {args.epochs}, batch {BATCH_SIZE}, steps {steps}, repeats {args.repeats} "
          f"(+1 warm-up), torch threads {__import__('torch').get_num_threads()}")
    for kind in ("direct", "governed"):
        m = seen[kind]
        print(f"{kind:9s} steps {m['steps']}, loss {m['first_loss']} -> {m['final_loss']}, LoRA on "
              f"{', '.join(m['target_modules'])}")
    if seen["direct"]["steps"] != steps:
        raise SystemExit(f"the direct loop took {seen['direct']['steps']} steps, the governed run {steps}")
    med = {k: statistics.median(v) for k, v in times.items()}
    for kind in ("direct", "governed"):
        print(f"{kind:9s} median {med[kind] * 1000:8.1f} ms  min {min(times[kind]) * 1000:8.1f} ms  "
              f"{steps / med[kind]:6.1f} steps/s  peak RSS {max(peaks[kind]) / 2**20:6.1f} MiB")
    ratio = med["governed"] / med["direct"]
    print(f"ratio governed/direct {ratio:.3f} (goal <= 1.1): {'MET' if ratio <= 1.1 else 'MISSED'}")
    result("local_peft tune: governed vs the same LoRA loop called directly (median)", baseline=med["direct"] * 1000,
           ours=med["governed"] * 1000, unit="ms", goal="ratio <= 1.1", met=ratio <= 1.1, tag="P2")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Benchmark: a governed ``local_peft`` tune versus the same LoRA loop called directly.

Same process, same base model, same rows, same hyperparameters and steps, interleaved
(direct, governed, direct, governed, ...) after one warm-up of each, so drift hits both alike.

- direct: ``causal_lm.train_lora(base_dir, rows, hp, out_dir)``.
- governed: what ``GovernedFineTuneOperator`` does around the loop once the leased rows are in
  hand: content hash of the rows, backend hyperparameter check, the job in its thread with
  progress reporting and cancel checks, the operator's wait/poll loop, and the content-addressed
  model store write with its manifest. The lease itself (issue, hand-over, revoke, verify) is
  measured by ``bench/lease.py``; lineage writes by the stack bench.

Reports wall time (median), steps/s and the peak resident memory of each run (sampled every
5 ms from /proc/self/statm). Goal: governed / direct <= 1.1.

    .venv/bin/python bench/tuning.py [--repeats N] [--epochs N]
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
from airflow_finetune_gov.tuning import causal_lm
from airflow_finetune_gov.tuning.backends import (
    RUNNING,
    SUCCEEDED,
    LocalPeftBackend,
    TuningRequest,
    ensure_demo_base,
    rows_sha256,
)
from bench.common import result

PAGE = os.sysconf("SC_PAGE_SIZE")


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


def direct(base_dir: Path, hp: dict, work: Path) -> dict:
    return causal_lm.train_lora(base_dir, BENIGN_SET, hp, work / "direct")


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
    args = parser.parse_args()
    hp = {"epochs": args.epochs}
    with tempfile.TemporaryDirectory(prefix="fgov-bench-tuning-") as tmp:
        root = Path(tmp)
        store = ModelStore(root / "store")
        started = time.perf_counter()
        base = ensure_demo_base(store)
        build = time.perf_counter() - started
        base_dir = store.path(base["name"], base["version"])
        times: dict[str, list[float]] = {"direct": [], "governed": []}
        peaks: dict[str, list[int]] = {"direct": [], "governed": []}
        steps = 0
        for i in range(args.repeats + 1):
            for kind in ("direct", "governed"):
                work = root / f"{kind}-{i}"
                work.mkdir()
                lines: list[str] = []
                with PeakRSS() as rss:
                    t0 = time.perf_counter()
                    metrics = direct(base_dir, hp, work) if kind == "direct" else governed(store, base, hp, work,
                                                                                           lines)
                    elapsed = time.perf_counter() - t0
                steps = metrics["steps"]
                if i:  # the first round is warm-up
                    times[kind].append(elapsed)
                    peaks[kind].append(rss.peak)
    print(f"demo base model build: {build:.1f} s ({base['metadata']['training']['parameters']} parameters, "
          f"{base['metadata']['training']['steps']} steps)")
    print(f"rows {len(BENIGN_SET)}, epochs {args.epochs}, steps {steps}, repeats {args.repeats} (+1 warm-up), "
          f"torch threads {__import__('torch').get_num_threads()}")
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

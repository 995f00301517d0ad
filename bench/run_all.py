"""Run every benchmark and print one table: measure, baseline, ours, ratio, goal, met? - and write it,
with the machine it ran on, to ``bench/RESULTS.md``.

Each ``bench/*.py`` also runs on its own (and prints more detail); here each one appends its goal rows
to a shared file (``bench.common.result``) and this script only collects them, so every figure in
the table was measured side by side with its baseline in the same run of its bench.

    .venv/bin/python bench/run_all.py [--only lease,eval] [--no-write]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
# P1 lease, P2 evaluation and tuning throughput, P3 lineage, P4 parse and policy, P5 slots, P6 demo time
ORDER = ["lease", "control_plane", "eval", "tuning", "model_import", "lineage", "parse", "approval", "slots", "stack"]


def machine() -> str:
    mem = cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        mem = f", {kb / 2**20:.0f} GiB RAM"
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    return (f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores{f' ({cpu})' if cpu else ''}{mem}, "
            f"Python {platform.python_version()}")


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if value == int(value) and abs(value) < 1000:
        return f"{int(value)}"
    return f"{value:,.4f}" if abs(value) < 0.1 else f"{value:,.1f}" if abs(value) < 1000 else f"{value:,.0f}"


def table(rows: list[dict]) -> list[str]:
    lines = ["| # | measure | baseline | ours | unit | ratio | goal | met? |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        met = "-" if r["met"] is None else "yes" if r["met"] else "**no**"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        lines.append(f"| {r['tag']} | {r['measure']} | {fmt(r['baseline'])} | {fmt(r['ours'])} | {r['unit']} | "
                     f"{ratio} | {r['goal']} | {met} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated bench names (default: all)")
    parser.add_argument("--no-write", action="store_true", help="print the table, leave bench/RESULTS.md alone")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else ORDER
    rows: list[dict] = []
    timings, failures = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.jsonl"
        for name in names:
            t = time.monotonic()
            print(f"== bench/{name}.py", flush=True)
            proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py")], env={
                **os.environ, "FGOV_BENCH_RESULTS": str(out)}, capture_output=True, text=True)
            timings[name] = time.monotonic() - t
            print(proc.stdout[-3000:], flush=True)
            if proc.returncode != 0:
                failures.append(name)
                print(f"bench/{name}.py exited {proc.returncode}:\n{proc.stderr[-2000:]}", file=sys.stderr)
        if out.exists():
            rows = [json.loads(line) for line in out.read_text().splitlines()]
    lines = table(rows)
    print("\n".join(lines))
    if failures:
        print(f"failed: {', '.join(failures)}", file=sys.stderr)
    if not args.no_write and not args.only:
        took = ", ".join(f"{n} {s:.0f} s" for n, s in timings.items())
        (BENCH / "RESULTS.md").write_text(
            "# Benchmark results\n\n"
            f"Measured {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} on {machine()}, by "
            "`.venv/bin/python bench/run_all.py` (each bench's baseline measured in the same run as its figure; "
            f"the benches one after another: {took}).\n\n" + "\n".join(lines) + "\n"
            + (f"\nFailed to run: {', '.join(failures)}.\n" if failures else ""))
        print(f"wrote {BENCH / 'RESULTS.md'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

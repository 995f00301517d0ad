"""P5: a pending approval and a deferred remote tuning job hold no worker slot.

Runs ``tests/reliability/test_slots.py`` (its own embedded stack, the real scheduler's pool counters)
and reports the most running and queued slots the default pool showed while both waited.

    .venv/bin/python bench/slots.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import result  # noqa: E402


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        samples_file = Path(tmp) / "slots.json"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "tests/reliability/test_slots.py"],
            cwd=ROOT, env={**os.environ, "FGOV_SLOT_SAMPLES": str(samples_file)}, capture_output=True, text=True)
        print(proc.stdout[-1500:])
        if proc.returncode != 0 or not samples_file.exists():
            print(proc.stderr[-1500:], file=sys.stderr)
            return 1
        samples = json.loads(samples_file.read_text())
    held = max(running + queued for running, queued, *_ in samples)
    print(f"{len(samples)} samples while an approval awaited input and a remote job was deferred: "
          f"running+queued slots at most {held} (deferred slots: {sorted({s[2] for s in samples})})")
    result("pending approval + deferred remote job: running+queued pool slots held (max of "
           f"{len(samples)} samples)", baseline=None, ours=held, unit="slots", goal="0", met=held == 0, tag="P5")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``fgov models import`` of a 4 GiB model directory: the importing process's peak RSS against the same CLI
doing nothing (``fgov models show`` of a missing model), and the import's time against ``cp`` then
``sha256sum`` of the same file (coreutils: the least a copy with a digest costs), all in this run.

The weights file is sparse (no disk to make it); the copy in the store is real. Goal (issue 17): peak memory
does not grow with model size.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import result

GIB = 1 << 30
PEAK = ("import json, resource, subprocess, sys\n"
        "t = __import__('time').perf_counter()\n"
        "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(json.dumps({'rc': r.returncode, 'err': r.stderr[-2000:], 's': __import__('time').perf_counter() - t,\n"
        "                  'kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")


def measured(*argv: str) -> dict:
    """``argv`` run as the only child of a fresh parent: its exit code, seconds and peak RSS (KiB)."""
    out = subprocess.run([sys.executable, "-c", PEAK, *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=4.0)
    args = parser.parse_args()
    size = int(args.gib * GIB)
    work = Path(tempfile.mkdtemp(prefix="fgov-bench-import-"))
    cli = [sys.executable, "-m", "airflow_finetune_gov.cli.main"]
    try:
        model = work / "model"
        model.mkdir()
        (model / "config.json").write_text(json.dumps({"model_type": "llama"}))
        with open(model / "model.safetensors", "wb") as fh:
            fh.truncate(size)
        idle = measured(*cli, "models", "show", "none", "--model-store", str(work / "store"))
        imported = measured(*cli, "models", "import", "m", str(model), "--model-store", str(work / "store"))
        if imported["rc"] != 0:
            raise RuntimeError(f"the import failed: {imported['err']}")
        shutil.rmtree(work / "store")
        t = time.perf_counter()
        subprocess.run(["cp", str(model / "model.safetensors"), str(work / "copy")], check=True)
        subprocess.run(["sha256sum", str(work / "copy")], check=True, capture_output=True)
        coreutils = time.perf_counter() - t
    finally:
        shutil.rmtree(work, ignore_errors=True)
    idle_mib, peak_mib = idle["kib"] / 1024, imported["kib"] / 1024
    print(f"import of {args.gib:g} GiB: peak RSS {peak_mib:.0f} MiB (the idle CLI: {idle_mib:.0f} MiB, "
          f"+{peak_mib - idle_mib:.0f} MiB); {imported['s']:.1f} s vs cp + sha256sum {coreutils:.1f} s "
          f"(ratio {imported['s'] / coreutils:.2f})")
    result(f"models import {args.gib:g} GiB: peak RSS vs the idle CLI", baseline=idle_mib, ours=peak_mib,
           unit="MiB", goal="+<= 64 MiB", met=peak_mib - idle_mib <= 64, tag="P7")
    result(f"models import {args.gib:g} GiB: time vs cp + sha256sum", baseline=coreutils, ours=imported["s"],
           unit="s", goal="-", met=None, tag="P7")
    return 0


if __name__ == "__main__":
    sys.exit(main())

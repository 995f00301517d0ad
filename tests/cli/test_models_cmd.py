"""``fgov models import``: a local model directory registered as a base model, in the real CLI process, with
its peak memory measured by the kernel (``ru_maxrss`` of the child) while it imports a multi-GiB file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from airflow_finetune_gov.registry.store import ModelStore

GIB = 1 << 30


def fgov(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "airflow_finetune_gov.cli.main", *args], capture_output=True,
                          text=True, check=False, timeout=600)


def peak_rss_of(*args: str) -> tuple[subprocess.CompletedProcess[str], int]:
    """``fgov *args`` run from a fresh parent whose only child it is, and that child's peak RSS in bytes."""
    code = ("import json, resource, subprocess, sys\n"
            "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
            "print(json.dumps({'rc': r.returncode, 'out': r.stdout, 'err': r.stderr,\n"
            "                  'kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    run = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "airflow_finetune_gov.cli.main", *args],
                         capture_output=True, text=True, check=True, timeout=600)
    got = json.loads(run.stdout)
    return subprocess.CompletedProcess(args, got["rc"], got["out"], got["err"]), got["kib"] * 1024


def checkpoint(folder: Path, weights_bytes: int) -> Path:
    """A Hugging Face-shaped model directory: config, tokenizer, a sparse weights file, a symlinked file (as in
    the hub's cache snapshots) and a hidden entry."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with open(folder / "model.safetensors", "wb") as fh:
        fh.truncate(weights_bytes)  # sparse: no disk, no memory to make it
        fh.seek(weights_bytes // 2)
        fh.write(b"not all zeros")
    blob = folder.parent / "blob-tokenizer"
    blob.write_text('{"version": "1.0"}')
    (folder / "tokenizer.json").symlink_to(blob)
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs")
    return folder


def test_import_registers_a_base_with_who_when_and_digests_in_bounded_memory(tmp_path: Path) -> None:
    source = checkpoint(tmp_path / "tiny-llama", 2 * GIB)
    store_root = tmp_path / "store"
    out, peak = peak_rss_of("models", "import", "tiny-llama", str(source), "--model-store", str(store_root), "--json")
    assert out.returncode == 0, out.stderr
    assert peak < 400 * 2**20, f"peak RSS {peak / 2**20:.0f} MiB while importing 2 GiB"  # not the file in memory
    result = json.loads(out.stdout)
    assert result["bytes"] > 2 * GIB and result["skipped"] == [".gitattributes"] and result["alias"] == "base"
    store = ModelStore(store_root)
    manifest = store.manifest("tiny-llama", result["version"])
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "tokenizer.json"]
    sha = subprocess.run(["sha256sum", str(source / "model.safetensors")], capture_output=True, text=True,
                         check=True).stdout.split()[0]
    assert manifest["files"]["model.safetensors"] == sha  # coreutils agrees with the streamed digest
    meta = manifest["metadata"]
    assert meta["kind"] == "base" and meta["format"] == "hf-causal-lm" and meta["source"] == str(source.resolve())
    assert meta["imported_by"] and meta["imported_at"].endswith("Z")
    assert not (store.path("tiny-llama", result["version"]) / "tokenizer.json").is_symlink()  # copied, not linked
    aliases = store.aliases("tiny-llama")
    assert aliases["base"]["version"] == result["version"] and aliases["_history"][-1]["run"] == "fgov models import"
    assert store.verify("tiny-llama", result["version"]) == []


@pytest.mark.parametrize(("make", "message"), [
    (lambda p: p.write_text("x"), "is not a directory"),
    (lambda p: (p.mkdir(), (p / "original").mkdir(), (p / "config.json").write_text("{}")), "has subdirectories"),
    (lambda p: p.mkdir(), "has no files to import"),
])
def test_import_refuses_what_is_not_a_model_directory_and_stores_nothing(tmp_path: Path, make, message: str) -> None:
    source = tmp_path / "m"
    make(source)
    out = fgov("models", "import", "m", str(source), "--model-store", str(tmp_path / "store"))
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "store" / "m").exists()


def test_an_import_as_root_into_the_control_planes_store_is_left_to_its_owner(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: the store's owner differs from the importing administrator only then")
    from airflow_finetune_gov.stack import users

    owner = users.ensure_task_user()  # any other user stands for the control plane's here
    store_root = users.own_tree(tmp_path / "store", owner, 0o755)
    source = checkpoint(tmp_path / "m", 1 << 20)
    out = fgov("models", "import", "m", str(source), "--model-store", str(store_root))
    assert out.returncode == 0, out.stderr
    assert {p.lstat().st_uid for p in (store_root / "m").rglob("*")} == {owner.pw_uid}

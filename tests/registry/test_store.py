from __future__ import annotations

import hashlib
import os

import pytest

from airflow_finetune_gov.registry.store import ModelStore, RegistryError, content_sha256


def test_content_addressed_versions(tmp_path) -> None:
    store = ModelStore(tmp_path)
    a = store.put("m", {"w.bin": b"abc"}, {"k": 1})
    again = store.put("m", {"w.bin": b"abc"}, {"k": 2})
    b = store.put("m", {"w.bin": b"abd"}, {})
    assert a["version"] == again["version"] != b["version"]
    assert (tmp_path / "m" / a["version"] / "manifest.json").exists()
    assert store.read("m", a["version"], "w.bin") == b"abc"


def test_verify_detects_changed_and_missing_files(tmp_path) -> None:
    store = ModelStore(tmp_path)
    v = store.put("m", {"w.bin": b"abc", "c.json": b"{}"}, {})["version"]
    assert store.verify("m", v) == []
    (tmp_path / "m" / v / "w.bin").write_bytes(b"evil")
    (tmp_path / "m" / v / "c.json").unlink()
    assert sorted(store.verify("m", v)) == ["c.json: missing", "w.bin: digest differs from the manifest"]


def test_aliases_keep_history(tmp_path) -> None:
    store = ModelStore(tmp_path)
    v1 = store.put("m", {"w": b"1"}, {})["version"]
    v2 = store.put("m", {"w": b"2"}, {})["version"]
    assert store.set_alias("m", "staging", v1, by="a", run="d/r1") == {"alias": "staging", "from": None, "to": v1}
    assert store.set_alias("m", "staging", v2, by="b", run="d/r2")["from"] == v1
    aliases = store.aliases("m")
    assert aliases["staging"]["version"] == v2
    assert [h["to"] for h in aliases["_history"]] == [v1, v2]


def test_bad_names_and_unknown_versions(tmp_path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(RegistryError, match="invalid model name"):
        store.put("../etc", {"w": b""}, {})
    with pytest.raises(RegistryError, match="is not in the store"):
        store.set_alias("m", "production", "0000", by="x", run="r")


def test_bytes_swapped_with_a_rewritten_manifest_no_longer_match_the_version(tmp_path) -> None:
    """A version names its content: whoever swaps a file and fixes the manifest's digest to match still fails
    verification, since the manifest then hashes to another version."""
    import json

    store = ModelStore(tmp_path)
    v = store.put("m", {"adapter.bin": b"evaluated"}, {})["version"]
    folder = store.path("m", v)
    (folder / "adapter.bin").write_bytes(b"poisoned")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["adapter.bin"] = hashlib.sha256(b"poisoned").hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert store.verify("m", v) == [f"manifest.json: its files hash to {content_sha256('m', manifest['files'])[:16]}, "
                                    f"not the version {v}"]


def test_put_dir_copies_a_staging_directory_and_names_the_version_by_content(tmp_path) -> None:
    store = ModelStore(tmp_path / "store")
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / "adapter.bin").write_bytes(b"\x00" * (3 << 20) + b"tail")  # more than one 1 MiB chunk
    (staging / "config.json").write_text("{}")
    m = store.put_dir("m", staging, ["adapter.bin", "config.json"], {"k": 1}, owner_uid=os.getuid())
    assert m == store.put("m", {"adapter.bin": b"\x00" * (3 << 20) + b"tail", "config.json": b"{}"}, {})
    assert store.verify("m", m["version"]) == []
    assert oct(store.path("m", m["version"]).stat().st_mode & 0o777) == "0o755"


@pytest.mark.parametrize("plant", ["symlink", "fifo", "other owner", "missing"])
def test_put_dir_takes_only_the_stagers_own_regular_files(tmp_path, plant: str) -> None:
    """What the control plane refuses from a task's staging directory: a symlink (to a file only the control
    plane could read), anything but a regular file, a file another user owns (a hard link of one), none."""
    secret = tmp_path / "secret"
    secret.write_text("root only")
    staging = tmp_path / "staging"
    staging.mkdir()
    owner = os.getuid()
    if plant == "symlink":
        (staging / "w.bin").symlink_to(secret)
    elif plant == "fifo":
        os.mkfifo(staging / "w.bin")
    elif plant == "other owner":
        (staging / "w.bin").write_text("x")
        owner = os.getuid() + 4242  # the stager is someone else: the file is not theirs
    store = ModelStore(tmp_path / "store")
    with pytest.raises(RegistryError, match={"symlink": "a symlink is never followed", "fifo": "not a regular file",
                                             "other owner": "not by the task that stages it",
                                             "missing": "cannot be stored"}[plant]):
        store.put_dir("m", staging, ["w.bin"], {}, owner_uid=owner)
    assert [p.name for p in (tmp_path / "store").iterdir()] == []  # nothing half-stored, not even the model's folder

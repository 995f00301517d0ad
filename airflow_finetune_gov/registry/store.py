"""Content-addressed model store: ``<root>/<name>/<version>/`` with a manifest, plus aliases.

A version is the first 16 hex digits of the sha256 over the manifest of file digests, so the
same bytes always get the same version and a changed file cannot keep its version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

STAGING = ".staging"  # under the store's root: the control plane's staging directories for tasks' files
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


class RegistryError(RuntimeError):
    pass


def _check_name(kind: str, value: str) -> str:
    if not _NAME.match(value):
        raise RegistryError(f"invalid {kind} {value!r}: letters, digits, '.', '_' and '-' only")
    return value


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(name: str, digests: dict[str, str]) -> str:
    """The sha256 a version is named after (its first 16 hex digits): over the model name and file digests."""
    return hashlib.sha256(json.dumps({"name": name, "files": digests}, sort_keys=True).encode()).hexdigest()


def _copy_own_file(source: Path, fname: str, dest: Path, owner_uid: int | None, follow_symlinks: bool = False) -> str:
    """Copy ``source/fname`` to ``dest`` and return its sha256; refuses a symlink (unless ``follow_symlinks``),
    anything but a regular file, a file another user owns (when ``owner_uid`` is given) and a file that grows
    while it is copied."""
    import stat

    try:
        fd = os.open(source / fname, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_symlinks else os.O_NOFOLLOW))
    except OSError as exc:
        raise RegistryError(f"{fname}: cannot be stored ({exc.strerror}; a symlink is never followed)") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise RegistryError(f"{fname}: not a regular file")
        if owner_uid is not None and info.st_uid != owner_uid:
            raise RegistryError(f"{fname}: owned by uid {info.st_uid}, not by the task that stages it "
                                f"(uid {owner_uid}): only the task's own files are stored")
        h = hashlib.sha256()
        copied = 0
        with open(dest, "xb") as out:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
                out.write(chunk)
                copied += len(chunk)
        if copied != info.st_size:
            raise RegistryError(f"{fname}: changed while it was stored ({info.st_size} -> {copied} bytes)")
    dest.chmod(0o644)
    return h.hexdigest()


class ModelStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def put(self, name: str, files: dict[str, bytes], metadata: dict[str, Any]) -> dict[str, Any]:
        _check_name("model name", name)
        for fname in files:
            _check_name("file name", fname)
        digests = {fname: hashlib.sha256(data).hexdigest() for fname, data in sorted(files.items())}

        def write(tmp: Path) -> None:
            for fname, data in files.items():
                (tmp / fname).write_bytes(data)

        return self._commit(name, digests, metadata, write)

    def put_dir(self, name: str, source: Path, filenames: list[str], metadata: dict[str, Any], *,
                owner_uid: int | None = None, follow_symlinks: bool = False) -> dict[str, Any]:
        """Copy ``filenames`` from ``source`` into a new version, hashing as it copies (1 MiB at a time: memory
        does not grow with the files). Each file is opened without following a symlink and must be a regular
        file, owned by ``owner_uid`` when given: whoever filled ``source`` can hand over their own files only,
        never one they merely point at (the control plane ingests a task's staging directory this way).
        ``follow_symlinks``: for an administrator's import (a Hugging Face cache snapshot is symlinks)."""
        _check_name("model name", name)
        if not filenames:
            raise RegistryError(f"no files to store for model {name}")
        for fname in filenames:
            _check_name("file name", fname)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix=".tmp-"))  # the model's folder only once it is stored
        digests: dict[str, str] = {}
        try:
            for fname in sorted(filenames):
                digests[fname] = _copy_own_file(source, fname, tmp / fname, owner_uid, follow_symlinks)
            return self._commit(name, digests, metadata, None, staged=tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _commit(self, name: str, digests: dict[str, str], metadata: dict[str, Any],
                write: Callable[[Path], None] | None, *, staged: Path | None = None) -> dict[str, Any]:
        """Name the version after ``digests``, write the manifest and move the files into place in one rename
        (a version is complete or absent); the same content already stored is kept as it is."""
        content_sha = content_sha256(name, digests)
        version = content_sha[:16]
        target = self.root / name / version
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = staged or Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
            if write is not None:
                write(tmp)
            manifest = {"name": name, "version": version, "sha256": content_sha, "files": digests,
                        "created_at": datetime.now(UTC).isoformat(), "metadata": metadata}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
            tmp.chmod(0o755)  # mkdtemp's 0700 would hide the version from the DAG user, who reads it
            try:
                os.rename(tmp, target)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not target.exists():
                    raise
        return self.manifest(name, version)

    def manifest(self, name: str, version: str) -> dict[str, Any]:
        path = self.root / _check_name("model name", name) / _check_name("version", version) / "manifest.json"
        if not path.exists():
            raise RegistryError(f"model {name} version {version} is not in the store at {self.root}")
        return json.loads(path.read_text())

    def verify(self, name: str, version: str) -> list[str]:
        """What does not match: each file against the manifest, and the manifest against the version (the
        version names its content, so bytes swapped with a rewritten manifest no longer match it)."""
        manifest = self.manifest(name, version)
        base = self.root / name / version
        problems = []
        content_sha = content_sha256(name, manifest.get("files", {}))
        if content_sha[:16] != version or manifest.get("sha256") != content_sha:
            problems.append(f"manifest.json: its files hash to {content_sha[:16]}, not the version {version}")
        for fname, digest in manifest["files"].items():
            p = base / fname
            if not p.exists():
                problems.append(f"{fname}: missing")
            elif file_sha256(p) != digest:
                problems.append(f"{fname}: digest differs from the manifest")
        return problems

    def read(self, name: str, version: str, fname: str) -> bytes:
        self.manifest(name, version)
        return (self.root / name / version / _check_name("file name", fname)).read_bytes()

    @contextmanager
    def _locked(self, name: str):
        (self.root / name).mkdir(parents=True, exist_ok=True)
        with open(self.root / name / ".lock", "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield

    def aliases(self, name: str) -> dict[str, Any]:
        path = self.root / _check_name("model name", name) / "aliases.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def path(self, name: str, version: str) -> Path:
        """The directory holding ``name`` ``version`` (checked to exist)."""
        self.manifest(name, version)
        return self.root / name / version

    def set_alias(self, name: str, alias: str, version: str, *, by: str, run: str) -> dict[str, Any]:
        with self._locked(name):
            return self._set_alias_unlocked(name, alias, version, by=by, run=run)

    def _set_alias_unlocked(self, name: str, alias: str, version: str, *, by: str, run: str) -> dict[str, Any]:
        _check_name("alias", alias)
        self.manifest(name, version)
        current = self.aliases(name)
        previous = current.get(alias, {}).get("version")
        history = current.get("_history", [])
        history.append({"alias": alias, "from": previous, "to": version, "by": by, "run": run,
                        "at": datetime.now(UTC).isoformat()})
        current[alias] = {"version": version, "by": by, "run": run}
        current["_history"] = history
        tmp = self.root / name / ".aliases.tmp"
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        os.replace(tmp, self.root / name / "aliases.json")
        return {"alias": alias, "from": previous, "to": version}

"""The embedded stack's OS users: the deployment's own (root: OpenBao, the scheduler and the api-server), the
control plane's (``fgov-control``: its keys, its configuration and the model store, which root's other
components cannot lend to DAG code because they hold none of it but by root's power), and the DAG user, which
parses DAG files (dag-processor), runs triggers (triggerer) and every task process (the provider's
executor), and can read none of the others' secrets."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

from airflow_finetune_gov.stack.procs import StackError

TASK_USER = "fgov-dag"
CONTROL_USER = "fgov-control"


def ensure_task_user(name: str = TASK_USER) -> pwd.struct_passwd:
    """The DAG user (a system user with no login shell and no home), created if missing; root only."""
    return ensure_user(name, "the DAG user")


def ensure_control_user(task_user: pwd.struct_passwd, name: str = CONTROL_USER) -> pwd.struct_passwd:
    """The control plane's user, created if missing, and a member of the DAG user's group (so that it can hand
    a task a staging directory of that group without being root; it gains nothing else from it)."""
    entry = ensure_user(name, "the control plane's user")
    group = grp.getgrgid(task_user.pw_gid)
    if name not in group.gr_mem:
        result = subprocess.run(["usermod", "--append", "--groups", group.gr_name, name], capture_output=True,
                                text=True, check=False)
        if result.returncode != 0:
            raise StackError(f"usermod --append --groups {group.gr_name} {name} failed: {result.stderr.strip()}")
    return entry


def ensure_user(name: str, what: str) -> pwd.struct_passwd:
    """A system user with no login shell and no home, created if missing; root only."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise StackError(f"{what} {name!r} does not exist and only root can create it: run `fgov stack up` "
                         f"as root, or create it (useradd --system --shell /usr/sbin/nologin {name})")
    result = subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                             "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True, check=False)
    if result.returncode != 0 and "already exists" not in result.stderr:
        raise StackError(f"useradd {name} failed: {result.stderr.strip()}")
    return pwd.getpwnam(name)


def make_interpreter_reachable(log=print) -> list[str]:
    """Let other users run this Python: add o+x (traverse, no listing) to the directories above its
    installation that lack it (pyenv under /root, say). Returns what was changed."""
    changed = []
    for base in {Path(sys.base_prefix).resolve(), Path(sys.prefix).resolve()}:
        for parent in [*reversed(base.parents), base]:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)
                changed.append(str(parent))
    if changed:
        log(f"made {', '.join(changed)} traversable by other users (o+x, no listing) so the DAG user can run "
            f"{sys.executable}")
    return changed


def own(path: Path, entry: pwd.struct_passwd, mode: int) -> Path:
    """Create ``path`` (a directory) for the DAG user with ``mode``."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)
    return path


def own_tree(path: Path, entry: pwd.struct_passwd, mode: int) -> Path:
    """Create ``path`` (a directory) for ``entry`` with ``mode``, giving it whatever in it another user owns
    (never following a symlink): what an earlier version of the stack, or root, left there."""
    path.mkdir(parents=True, exist_ok=True)
    for item in [path, *path.rglob("*")]:
        if item.lstat().st_uid != entry.pw_uid:
            os.lchown(item, entry.pw_uid, entry.pw_gid)
    path.chmod(mode)
    return path


def check_reads(entry: pwd.struct_passwd, path: Path, what: str) -> None:
    """Fail with the fix named if ``entry`` cannot read ``path``."""
    result = subprocess.run(["test", "-r", str(path)], user=entry.pw_uid, group=entry.pw_gid, extra_groups=[],
                            capture_output=True, check=False, env={"PATH": "/usr/bin:/bin"}, cwd="/")
    if result.returncode != 0:
        raise StackError(f"{what} {path} is not readable by {entry.pw_name}, the control plane's user: make it and "
                         "the directories above it readable (chmod o+r on the file, o+x on the directories)")


def check_runs_python(entry: pwd.struct_passwd) -> None:
    """Fail with the fix named if the DAG user cannot start this interpreter and import the provider."""
    result = subprocess.run([sys.executable, "-c", "import airflow_finetune_gov"], user=entry.pw_uid,
                            group=entry.pw_gid, extra_groups=[], capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, cwd="/")
    if result.returncode != 0:
        raise StackError(f"the DAG user {entry.pw_name} cannot run {sys.executable} and import the provider: "
                         f"{result.stderr.strip()[-500:]}. The virtualenv and the project must be readable by "
                         "other users (chmod -R o+rX)")

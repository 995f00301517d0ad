"""The embedded stack's OS users: the deployment's own (root: OpenBao, the control plane, the scheduler and
the api-server) and the DAG user, which parses DAG files (dag-processor), runs triggers (triggerer) and
every task process (the provider's executor), and can read none of the deployment's secrets."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

from airflow_finetune_gov.stack.procs import StackError

TASK_USER = "fgov-dag"


def ensure_task_user(name: str = TASK_USER) -> pwd.struct_passwd:
    """The DAG user (a system user with no login shell and no home), created if missing; root only."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise StackError(f"the DAG user {name!r} does not exist and only root can create it: run `fgov stack up` "
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


def check_runs_python(entry: pwd.struct_passwd) -> None:
    """Fail with the fix named if the DAG user cannot start this interpreter and import the provider."""
    result = subprocess.run([sys.executable, "-c", "import airflow_finetune_gov"], user=entry.pw_uid,
                            group=entry.pw_gid, extra_groups=[], capture_output=True, text=True, check=False,
                            env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}, cwd="/")
    if result.returncode != 0:
        raise StackError(f"the DAG user {entry.pw_name} cannot run {sys.executable} and import the provider: "
                         f"{result.stderr.strip()[-500:]}. The virtualenv and the project must be readable by "
                         "other users (chmod -R o+rX)")

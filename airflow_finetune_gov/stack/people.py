"""The embedded stack's people: Airflow users and roles in the FAB auth manager, in two teams.

- ``Team member``: what Airflow's ``User`` role may do (trigger, clear, answer required actions), but on no DAG
  by itself: a team member reaches a DAG only through the team's role, which the control plane keeps granted
  on the DAGs the policy gives that team (:mod:`airflow_finetune_gov.control.teams`);
- one role per team (``support``, ``research``) and one approver role per team (``support-approvers``,
  ``research-approvers``): the policy names approvers by role (``role:support-approvers``), and the control plane
  reads who holds it when a request opens and again when an answer is counted;
- ``Governance reader``: reads Airflow's plugin list, which the UI needs to show the governance view's nav entry
  and DAG-run tab (FAB gives it to ``Op`` and ``Admin`` only); every user but ``admin`` holds it;
- ``auditor``: Airflow's ``Viewer`` (every DAG, read only); ``admin``: ``Admin`` (ops, who change memberships).

:func:`sync` runs in a process of its own with the deployment's configuration (``python -m
airflow_finetune_gov.stack.people``), reading the passwords on stdin; it creates what is missing and sets each
user's password and roles to the ones here, so ``fgov stack up`` on an existing state directory puts back a
membership a test changed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from airflow_finetune_gov.stack.procs import StackError

MEMBER_ROLE = "Team member"
READER_ROLE = "Governance reader"
TEAMS = ("support", "research")
# user -> roles. approver3 is a support member who is no approver (until ops make them one).
USERS: dict[str, list[str]] = {
    "requester": [MEMBER_ROLE, READER_ROLE, "support"],
    "approver1": [MEMBER_ROLE, READER_ROLE, "support", "support-approvers"],
    "approver2": [MEMBER_ROLE, READER_ROLE, "support", "support-approvers"],
    "approver3": [MEMBER_ROLE, READER_ROLE, "support"],
    "researcher": [MEMBER_ROLE, READER_ROLE, "research"],
    "research-approver": [MEMBER_ROLE, READER_ROLE, "research", "research-approvers"],
    "research-approver2": [MEMBER_ROLE, READER_ROLE, "research", "research-approvers"],
    "auditor": ["Viewer", READER_ROLE],
    "admin": ["Admin"],
}
ROLES = (MEMBER_ROLE, READER_ROLE, *TEAMS, *(f"{t}-approvers" for t in TEAMS))


def sync(home: Path, passwords: dict[str, str], env: dict[str, str]) -> None:
    """Create or put back the roles and users above in the deployment whose ``AIRFLOW_HOME`` is ``home``."""
    result = subprocess.run([sys.executable, "-m", "airflow_finetune_gov.stack.people"], env=env, cwd=home,
                            input=json.dumps({"users": USERS, "passwords": passwords}), capture_output=True,
                            text=True, timeout=300, check=False)
    if result.returncode != 0:
        raise StackError(f"creating the Airflow users and roles failed:\n{result.stderr[-3000:]}")


def _member_permissions(sm: Any) -> list[tuple[str, str]]:
    """``Viewer`` and ``User`` permissions without the global ``DAGs`` resource (which is every DAG)."""
    from airflow.providers.fab.www.security import permissions

    return [(action, resource) for action, resource in [*sm.VIEWER_PERMISSIONS, *sm.USER_PERMISSIONS]
            if resource != permissions.RESOURCE_DAG]


def _apply(spec: dict[str, Any]) -> None:
    from airflow.providers.fab.auth_manager.cli_commands.utils import get_application_builder
    from airflow.providers.fab.www.security import permissions
    from airflow.utils.providers_configuration_loader import providers_configuration_loaded

    providers_configuration_loaded(lambda: None)()  # the FAB provider's configuration defaults

    with get_application_builder() as appbuilder:
        sm = appbuilder.sm
        appbuilder.add_permissions(update_perms=True)
        sm.sync_roles()  # Airflow's own roles (Admin, Op, User, Viewer, Public) with their permissions
        for name in ROLES:
            if sm.find_role(name) is None:
                sm.add_role(name)
        member = sm.find_role(MEMBER_ROLE)
        for action, resource in _member_permissions(sm):
            sm.add_permission_to_role(member, sm.create_permission(action, resource))
        sm.add_permission_to_role(sm.find_role(READER_ROLE), sm.create_permission(
            permissions.ACTION_CAN_READ, permissions.RESOURCE_PLUGIN))
        for username, role_names in spec["users"].items():
            roles = [sm.find_role(r) for r in role_names]
            password = spec["passwords"][username]
            user = sm.find_user(username=username)
            if user is None:
                if not sm.add_user(username, username, "(fgov stack)", f"{username}@localhost", roles, password):
                    raise SystemExit(f"could not create Airflow user {username}")
                continue
            user.roles = roles
            sm.update_user(user)
            sm.reset_password(user.id, password)


if __name__ == "__main__":
    _apply(json.loads(sys.stdin.read()))

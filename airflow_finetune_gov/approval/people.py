"""Who the policy's approvers are now, as Airflow's auth manager says: role members and the ids HITL assigns.

The policy names approvers by user name or by role (``role:support-approvers``). With the FAB auth manager, a
role's members are read from its tables in the metadata database (``ab_user``, ``ab_role``, ``ab_user_role``)
each time it matters: when a request opens (the decision's approvers), and when an answer is counted (one
taken out of the role since does not count). Only the deployment's components read them: the DAG user's
database login has no privilege on those tables (``stack.provision.grant_dag_metadata``), so DAG code can
neither read nor change who approves.

HITL assigns users by the auth manager's user id (``get_id()``), which FAB makes the numeric row id
(apache/airflow#61817); the policy, lineage and notifications speak user names. :func:`hitl_users` maps one to
the other.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from airflow_finetune_gov.policy.engine import Members, PolicyError

if TYPE_CHECKING:
    from airflow.sdk.execution_time.hitl import HITLUser

log = logging.getLogger(__name__)


def fab() -> bool:
    """Whether this process's Airflow configuration uses the FAB auth manager (users and roles in the database)."""
    from airflow.configuration import conf

    return "FabAuthManager" in conf.get("core", "auth_manager", fallback="")


def _rows(query: str, **params: Any) -> list[tuple[Any, ...]]:
    # a connection of its own, never Airflow's scoped session: closing that would detach what a caller holds
    from airflow import settings
    from sqlalchemy import text

    if settings.engine is None:
        settings.configure_orm()
    assert settings.engine is not None
    with settings.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(query), params)]


def role_members(role: str) -> list[str]:
    """The active users holding Airflow role ``role``, by name. An unknown role is a policy error (a typo
    would otherwise leave a team without approvers, silently)."""
    if not _rows("SELECT 1 FROM ab_role WHERE name = :role", role=role):
        raise PolicyError(f"the policy names role:{role}, and Airflow has no role {role!r}: create it (Security > "
                          "List Roles, or POST /auth/fab/v1/roles) or correct the policy")
    return [r[0] for r in _rows(
        "SELECT u.username FROM ab_user u JOIN ab_user_role ur ON ur.user_id = u.id JOIN ab_role r ON "
        "r.id = ur.role_id WHERE r.name = :role AND u.active ORDER BY u.username", role=role)]


def members() -> Members | None:
    """The role lookup for :meth:`Policy.decide` and :meth:`Policy.approvers_for` in this process (None where
    the auth manager keeps no roles to read)."""
    return role_members if fab() else None


def approvers_now(dag_id: str) -> list[str]:
    """The user names who approve ``dag_id``'s changes at this moment, as the policy file and the roles say."""
    from airflow_finetune_gov import common

    return common.policy().approvers_for(dag_id, members())


def approvers_now_of(context: Any, log: Any = None) -> list[str]:
    """:func:`approvers_now` for the calling task's run: a task asks the control plane (which reads the roles; the
    DAG user cannot), the control plane reads them itself."""
    from airflow_finetune_gov import common

    if common.remote():
        return [str(a) for a in common.control().execute("approvers_now", {}, log=log)]
    return approvers_now(context["ti"].dag_id)


def hitl_users(names: Iterable[str]) -> list[HITLUser]:
    """HITL's ``assigned_users`` for ``names``: ``{"id", "name"}`` with the auth manager's user id. A name with
    no Airflow user (FAB) is left out and logged: nobody could answer as them."""
    names = list(names)
    if not fab():
        return [{"id": n, "name": n} for n in names]
    ids = {} if not names else {r[1]: str(r[0]) for r in _rows(
        "SELECT id, username FROM ab_user WHERE username = ANY(:names) AND active", names=names)}
    missing = [n for n in names if n not in ids]
    if missing:
        log.warning("approvers with no active Airflow user, not assigned: %s", ", ".join(missing))
    return [{"id": ids[n], "name": n} for n in names if n in ids]

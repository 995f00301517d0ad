"""Airflow's DAG-level access per team, kept by the control plane from the policy's ``teams``.

Each team's ``airflow_role`` (an FAB role) holds read and edit on exactly the DAGs the policy gives the team
(``DAG:<dag_id>``): its members see, trigger and answer the required actions of those DAGs and no others. The
control plane grants a DAG's permissions once the dag-processor has listed it, and takes away those of DAGs no
longer the team's (a DAG renamed, a policy changed), every few seconds.

A DAG's own ``access_control`` is DAG code: the DAG user's components run without the FAB auth manager, so the
dag-processor syncs none of it, and their database login cannot write the permission tables
(``stack.provision.grant_dag_metadata``). What a team may reach in Airflow is the policy's, as is what its runs
may change.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

log = logging.getLogger(__name__)
DAG_ACTIONS = ("can_read", "can_edit")
DAG_PREFIX = "DAG:"


def sync(policy: Any) -> dict[str, list[str]]:
    """Grant each team's role its DAGs and revoke the rest; returns team -> DAG ids granted."""
    from airflow.models.dag import DagModel
    from airflow.providers.fab.www.security_appless import ApplessAirflowSecurityManager
    from airflow.utils.session import create_session
    from sqlalchemy import select

    granted: dict[str, list[str]] = {}
    with create_session() as session:
        sm = ApplessAirflowSecurityManager(session=session)
        dag_ids = list(session.scalars(select(DagModel.dag_id)))
        for team in policy.teams.values():
            if not team.airflow_role:
                continue
            role = sm.find_role(team.airflow_role)
            if role is None:
                log.warning("team %s: Airflow has no role %r (the policy's airflow_role): its members reach no DAG; "
                            "create the role", team.name, team.airflow_role)
                continue
            mine = sorted(d for d in dag_ids if policy.team_of(d) is team)
            want = {(action, f"{DAG_PREFIX}{d}") for d in mine for action in DAG_ACTIONS}
            held = {(p.action.name, p.resource.name): p for p in role.permissions
                    if p.resource.name.startswith(DAG_PREFIX)}
            for action, resource in sorted(want - held.keys()):
                sm.add_permission_to_role(role, sm.create_permission(action, resource))
                log.info("team %s: role %s may now %s %s", team.name, role.name, action, resource)
            for key in sorted(held.keys() - want):
                sm.remove_permission_from_role(role, held[key])
                log.info("team %s: role %s may no longer %s %s", team.name, role.name, *key)
            granted[team.name] = mine
    return granted


class TeamSync(threading.Thread):
    """Runs :func:`sync` with the policy as it is now, every ``poll`` seconds."""

    def __init__(self, poll: float) -> None:
        super().__init__(name="fgov-teams", daemon=True)
        self.poll = poll
        self.stopped = threading.Event()

    def run(self) -> None:
        from airflow_finetune_gov import common

        while not self.stopped.is_set():
            try:
                policy = common.policy()
                if policy.teams:
                    sync(policy)
            except Exception:  # a database hiccup: the next round tries again
                log.exception("keeping the teams' DAG access in sync failed")
            self.stopped.wait(self.poll)


def start(poll: float = 5.0) -> TeamSync | None:
    """The control plane's team sync, when the deployment's auth manager is FAB (None otherwise)."""
    from airflow_finetune_gov.approval import people

    if not people.fab():
        return None
    thread = TeamSync(poll)
    thread.start()
    return thread

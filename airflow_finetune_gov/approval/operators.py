"""FineTuneApprovalOperator: Airflow Human-in-the-loop, plus what it lacks for governed changes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.exceptions import AirflowFailException, TaskAwaitingInput
from airflow.sdk.execution_time.hitl import upsert_hitl_detail

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval.verify import (
    ApprovalMissing,
    answered,
    answers_to,
    policy_decision,
    request_sha256,
)
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin

APPROVE, REJECT = "Approve", "Reject"
_MARKUP = re.compile(r"[\\`*_\[\]<>|~!#]")


def _cell(text: str, limit: int = 160) -> str:
    """``text`` (a training row's, written by whoever supplied the data) as one Markdown table cell: one line, at
    most ``limit`` characters, Markdown's markup characters escaped so it shows as text (no link, image or HTML)."""
    flat = " ".join(str(text).split())
    flat = flat if len(flat) <= limit else flat[:limit - 1] + "…"
    return _MARKUP.sub(r"\\\g<0>", flat)


def dag_owners(context: Any) -> set[str]:
    """The DAG's owners, people who may not approve (or review) its changes."""
    owners = {o.strip() for o in str(getattr(context.get("dag"), "owner", "") or "").split(",") if o.strip()}
    owners.discard("airflow")  # Airflow's placeholder owner is not a person
    return owners


def excluded_people(context: Any) -> set[str]:
    """Who may not approve (or review) this run's change: its requester and the DAG's owners."""
    return {common.requester(context), *dag_owners(context)}


class FineTuneApprovalOperator(GovernedOpenLineageMixin, HITLOperator):
    """Ask the policy's approvers, minus the requester and the DAG's owners, to approve the change.

    - The request body is the change summary an approver needs (model, dataset, classification,
      tier and the policy's reasons, requester, lineage link).
    - ``assigned_users`` is the approver group minus the requester, so Airflow itself answers the
      requester's own approval with 403; the responder is checked again here, and a forbidden answer is
      recorded as a violation and does not count.
    - Tier ``quorum``: the same request re-opens after each approval until N distinct approvers
      have approved; an approver answering twice does not count twice; one Reject rejects.
    - No default option: when ``response_timeout`` passes (measured from the first request, across
      quorum rounds), the request fails closed (never approves) and is recorded as expired.
    - Tier ``auto``: no human; the recorded policy decision is the approval.
    - Every request and answer (who, when, which option, the comment typed in the form) goes to
      lineage; downstream tasks verify approval from lineage only.
    """

    ui_color = "#fff4e5"

    def __init__(self, *, subject: str = "Approve a governed fine-tune", **kwargs: Any) -> None:
        kwargs.setdefault("options", [APPROVE, REJECT])
        kwargs.setdefault("defaults", None)
        kwargs.setdefault("params", {"comment": Param("", type="string", title="Comment",
                                                      description="Why you approve or reject (recorded in lineage)")})
        super().__init__(subject=subject, **kwargs)

    def _excluded(self, context: Any) -> set[str]:
        return excluded_people(context)

    def execute(self, context: Any) -> Any:
        opened = self._open(context)
        if "granted" in opened:
            return opened["granted"]
        return super().execute(context)

    def _open(self, context: Any, reopen: str | None = None) -> dict[str, Any]:
        """Have the request rendered and recorded where the decision is kept (the control plane, with one) and
        take exactly that request to open in Airflow."""
        owners = sorted(dag_owners(context))
        if common.remote():
            opened = common.control().execute("approval_gate", {
                "owners": owners, "reopen": reopen,
                "response_timeout": self.response_timeout.total_seconds() if self.response_timeout else None,
            }, log=self.log)
        else:
            opened = self.open_request(context, owners=owners, reopen=reopen)
        if "granted" not in opened:
            self.subject, self.body, self.options = opened["subject"], opened["body"], opened["options"]
            self.assigned_users = opened["assigned_users"]
        return dict(opened)

    def open_request(self, context: Any, *, owners: Sequence[str] = (), reopen: str | None = None) -> dict[str, Any]:
        """Render this run's request for approval from its latest decision and record it with the hash of what
        the approvers will be shown (``approval.requested``); in the control plane when there is one (the task
        then opens exactly this request in Airflow). ``owners`` (the DAG's, sent by the task) can only take
        people out of the approvers; the requester is taken out here, as the decision names them.

        Returns ``{"granted": ...}`` for tier auto, else the request (``subject``, ``body``, ``options``,
        ``assigned_users``, ``remaining_seconds``); ``reopen`` re-opens it for another round of a quorum."""
        ti = context["ti"]
        try:
            decision = policy_decision(common.run_events(context), ti.run_id)
        except ApprovalMissing as exc:
            raise AirflowFailException(str(exc)) from exc
        if decision["tier"] == "auto" and reopen is None:
            common.record(context, "approval.granted", {
                "approval_id": uuid.uuid4().hex, "responder": "policy", "option": APPROVE,
                "tier": "auto", "policy_sha256": decision["policy_sha256"], **answered(decision),
            }, actor="policy")
            self.log.info("tier auto: approved by policy %s", decision["policy_sha256"][:12])
            return {"granted": {"chosen_options": [APPROVE], "responded_by_user": {"id": "policy", "name": "policy"}}}
        excluded = {decision["request"]["requester"], *owners}
        approvers = [a for a in decision["approvers"] if a not in excluded]
        needed = self._needed(decision)
        if len(approvers) < needed:
            reason = f"not enough eligible approvers for {needed} approval(s)"
            common.record(context, "approval.rejected", {"responder": "policy", "reason": reason, **answered(decision)},
                          actor="policy")
            common.record(context, "approval.decided", {"outcome": "rejected", "reason": reason,
                                                        "tier": decision["tier"]}, actor="policy")
            raise AirflowFailException(f"not enough eligible approvers: tier {decision['tier']} needs {needed}, and "
                                       f"the approver group {decision['approvers']} minus requester/owners "
                                       f"{sorted(excluded)} leaves {approvers}")
        req = decision["request"]
        if req.get("change") == "rollback":
            subject = (f"Approve rollback of {req['model']}:{req['target_environment']} from "
                       f"{req['base_version']} to {req['rollback_to']}")
        else:
            subject = f"Approve fine-tune of {req['model']} on dataset {req['dataset']} for {req['target_environment']}"
        body = self._summary(context, decision, approvers)
        options = [APPROVE, REJECT]
        shown = request_sha256(subject, body, options)
        requests = [e for e in common.run_events(context, "approval.requested")
                    if e.task_id == ti.task_id and e.try_number == int(ti.try_number)]
        remaining: timedelta | None = None
        if reopen is not None and self.response_timeout is not None:
            first = datetime.fromisoformat(requests[0].created_at) if requests else datetime.now(UTC)
            remaining = first + self.response_timeout - datetime.now(UTC)
            if remaining.total_seconds() <= 0:
                self._expired(context, "timeout", f"no quorum before the deadline ({reopen})")
        common.record(context, "approval.requested", {
            "tier": decision["tier"], "approvers": approvers, "excluded": sorted(excluded), "needed": needed,
            "round": len(requests) + 1, "policy_sha256": decision["policy_sha256"], **answered(decision),
            "subject": subject, "request_sha256": shown,
            **({"reason": reopen, "remaining_seconds": round(remaining.total_seconds(), 1) if remaining else None}
               if reopen is not None else {"response_timeout_seconds": self.response_timeout.total_seconds()
                                           if self.response_timeout else None}),
        }, actor="policy")
        return {"subject": subject, "body": body, "options": options,
                "assigned_users": [{"id": a, "name": a} for a in approvers],
                "remaining_seconds": remaining.total_seconds() if remaining is not None else None}

    @staticmethod
    def _data_rows(decision: dict[str, Any]) -> list[tuple[str, str]]:
        rows = []
        digest = decision.get("dataset")
        if digest:
            rows += [("Dataset URI", digest["uri"]), ("Rows", str(digest["rows"])),
                     ("Content sha256", f"{digest['sha256']} (tuning refuses any other content)")]
        hp = decision.get("hyperparameters")
        if hp is not None:
            rows.append(("Hyperparameters", ", ".join(f"{k}={v}" for k, v in sorted(hp.items())) or "(none)"))
        return rows

    def _screening_rows(self, context: Any, decision: dict[str, Any]) -> list[tuple[str, str]]:
        """What the screening found, and the first flagged rows (read here through the screening lease: row text is
        never in lineage, only in the request the approvers see)."""
        found = decision.get("screening")
        if not found:
            return []
        if found["status"] != "screened":
            return [("Screening", f"not screened: {found['reason']}")]
        base = found.get("base") or {}
        rows = [("Screening", f"{found['flagged']} of {found['screened']} rows flagged ({found['flagged_share']:.0%}) "
                 f"- the row answers a request that {base.get('name', 'the base model')} {base.get('version', '')} "
                 f"refuses ({found['detector']})" + (f"; {found['screened']} of {found['rows']} rows screened (an "
                                                    "even sample)" if found["screened"] < found["rows"] else ""))]
        show = found["flagged_ids"][:common.policy().screening.examples]
        if not show:
            return rows
        from airflow_finetune_gov.credentials.operators import service_credentials

        with service_credentials(context, "screen") as creds, \
                common.datasets_connection(creds.username, creds.password) as conn:
            texts = conn.execute("SELECT id, prompt, response FROM catalog.dataset_rows(%s) WHERE id = ANY(%s)",
                                 (decision["dataset_table"], show)).fetchall()
        for row_id, prompt, response in texts:
            rows.append((f"Flagged row {row_id}", f"{_cell(prompt)} → {_cell(response)}"))
        return rows

    @staticmethod
    def _needed(decision: dict[str, Any]) -> int:
        return int(decision["quorum"]) if decision["tier"] == "quorum" else 1

    def _summary(self, context: Any, decision: dict[str, Any], approvers: list[str]) -> str:
        req = decision["request"]
        ti = context["ti"]
        template = settings.get("lineage_url_template", required=False)
        link = template.format(dag_id=ti.dag_id, run_id=ti.run_id) if template else "(not configured)"
        if req.get("change") == "rollback":
            intro = (f"A rollback changes which version of {req['model']} serves {req['target_environment']}. "
                     "Approve only if the version you go back to should serve there again.")
            change_rows = [("Model", req["model"]), ("Alias (environment)", req["target_environment"]),
                           ("From version", req["base_version"]), ("To version", req["rollback_to"])]
        else:
            intro = ("A fine-tune can change what the model refuses and whether it can be jailbroken. "
                     "Approve only if you expect this data to be safe for this model and environment.")
            change_rows = [
                ("Model", f"{req['model']} {req.get('base_version') or ''}".strip()),
                ("Dataset", f"{req['dataset']} (table {decision['dataset_table']})"),
                *self._data_rows(decision),
                *self._screening_rows(context, decision),
                ("Classification", decision["classification"]),
                ("Target environment", req["target_environment"]),
                ("Tuning method", req["tuning_method"]),
            ]
        rows = [
            *change_rows,
            ("Risk tier", f"{decision['tier']} - {'; '.join(decision['reasons'])}"),
            ("Approvals needed", f"{self._needed(decision)} distinct approver(s); one Reject rejects"),
            ("Policy", f"{decision['policy_name']} sha256 {decision['policy_sha256'][:16]}"),
            ("Requested by", req["requester"]),
            ("Eligible approvers", ", ".join(approvers)),
            ("Run", f"{ti.dag_id} / {ti.run_id}"),
            ("Lineage", link),
        ]
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        return f"{intro}\n\n| | |\n|---|---|\n{table}"

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        ti = context["ti"]
        decision = policy_decision(common.run_events(context), ti.run_id)
        if "error" in event:
            self._expired(context, event.get("error_type"), str(event.get("error"))[:500])
        result = super().execute_complete(context, event)
        responder = event.get("responded_by_user") or {}
        who = responder.get("id") or responder.get("name") or "unknown"
        option = (event.get("chosen_options") or [None])[0]
        comment = str((event.get("params_input") or {}).get("comment") or "")[:2000]
        answered_at = event.get("responded_at")
        answer = {"responder": who, "option": option, "comment": comment,
                  "responded_at": answered_at.isoformat() if isinstance(answered_at, datetime) else answered_at,
                  **answered(decision)}
        asked = self._asked(context)
        if asked is not None and asked != decision["decision_sha256"]:
            # The policy check ran again (cleared on its own) while this request was open: the approver
            # saw the summary of another decision, so this answer answers nothing.
            common.record(context, "approval.superseded", {
                **answer, "asked_decision_sha256": asked,
                "reason": "the run's policy decision changed while the request was open"}, actor=who)
            raise AirflowFailException(
                f"the answer by {who} was given to decision sha256 {asked[:16]}, but the run's policy decision is now "
                f"{decision['decision_sha256'][:16]} (the policy check ran again): clear the approval gate to ask "
                "about the current decision")
        allowed = self._asked_approvers(context, decision)
        if who not in allowed:
            common.record(context, "approval.violation", {
                **answer, "allowed": sorted(allowed),
                "reason": "responder is the requester, an owner, or not an approver",
            }, actor=who)
            self.log.warning("%s may not answer this approval (separation of duties): recorded as a violation, "
                             "the request stays open", who)
            return self._reopen(context, reason=f"violation by {who}")
        if option != APPROVE:
            common.record(context, "approval.rejected", {**answer, "tier": decision["tier"]}, actor=who)
            common.record(context, "approval.decided", {"outcome": "rejected", "reason": f"rejected by {who}",
                                                        "tier": decision["tier"]}, actor="policy")
            raise AirflowFailException(f"fine-tune rejected by {who}" + (f": {comment}" if comment else ""))
        granted = {p["responder"] for p in answers_to(common.run_events(context, "approval.granted"),
                                                      "approval.granted", decision)}
        if who in granted:
            common.record(context, "approval.duplicate", {**answer, "approved_by": sorted(granted)}, actor=who)
            self.log.warning("%s already approved this change; a second answer does not count", who)
            return self._reopen(context, reason=f"duplicate answer by {who}")
        common.record(context, "approval.granted", {
            **answer, "approval_id": uuid.uuid4().hex, "tier": decision["tier"],
            "policy_sha256": decision["policy_sha256"],
        }, actor=who)
        granted.add(who)
        needed = self._needed(decision)
        if len(granted) < needed:
            return self._reopen(context, reason=f"{len(granted)} of {needed} approvals")
        common.record(context, "approval.decided", {"outcome": "approved", "approvers": sorted(granted),
                                                    "tier": decision["tier"]}, actor="policy")
        return result

    def _asked_approvers(self, context: Any, decision: dict[str, Any]) -> set[str]:
        """Whom this task try's request was opened for (the control plane left out the requester the decision
        names and the DAG's owners); the decision's approvers minus this task's view of them otherwise."""
        ti = context["ti"]
        requests = [e.payload_dict() for e in common.run_events(context, "approval.requested")
                    if e.task_id == ti.task_id and e.try_number == int(ti.try_number)]
        opened = [r["approvers"] for r in requests if r.get("approvers")]
        return set(opened[0]) if opened else set(decision["approvers"]) - self._excluded(context)

    @staticmethod
    def _asked(context: Any) -> str | None:
        """The decision hash this task try's request was opened for."""
        ti = context["ti"]
        requests = [e.payload_dict() for e in common.run_events(context, "approval.requested")
                    if e.task_id == ti.task_id and e.try_number == int(ti.try_number)]
        return requests[0].get("decision_sha256") if requests else None

    def _expired(self, context: Any, error_type: Any, error: str) -> None:
        common.record(context, "approval.expired", {"error_type": error_type, "error": error}, actor="airflow")
        common.record(context, "approval.decided", {"outcome": "rejected", "reason": "expired"}, actor="policy")
        raise AirflowFailException(f"approval not given in time ({error_type}): the gate fails closed (rejected)")

    def _reopen(self, context: Any, *, reason: str) -> Any:
        """Ask again on the same request (Airflow keeps one HITL detail per task try; upserting it clears
        the last answer) with whatever is left of the original ``response_timeout``."""
        ti = context["ti"]
        opened = self._open(context, reopen=reason)
        upsert_hitl_detail(ti_id=context["task_instance"].id, options=self.options, subject=self.subject,
                           body=self.body, defaults=self.defaults, multiple=self.multiple,
                           params=self.serialized_params, assigned_users=self.assigned_users or [])
        remaining = opened.get("remaining_seconds")
        self.log.info("%s/%s: asked again (%s)", ti.dag_id, ti.task_id, reason)
        raise TaskAwaitingInput(method_name="execute_complete",
                                timeout=timedelta(seconds=remaining) if remaining is not None else None)

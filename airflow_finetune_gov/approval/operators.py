"""FineTuneApprovalOperator: Airflow Human-in-the-loop, plus what it lacks for governed changes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict
from airflow.sdk.exceptions import AirflowFailException, TaskAwaitingInput
from airflow.sdk.execution_time.hitl import HITLUser, upsert_hitl_detail

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval import people
from airflow_finetune_gov.approval.verify import (
    APPROVE,
    REJECT,
    ApprovalMissing,
    answered,
    answers_to,
    policy_decision,
    request_sha256,
)
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin

_MARKUP = re.compile(r"[\\`*_\[\]<>|~!#]")
# What "redacted" masks in rows shown to approvers: e-mail addresses, URLs, then any run of digits (phone, card,
# account numbers). Names and free-text identifiers are not found: classify such data "sensitive" (shown: none).
_REDACT = ((re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"), "[email]"), (re.compile(r"https?://\S+"), "[url]"),
           (re.compile(r"\d[\d ()./-]*\d|\d"), "[number]"))


def _cell(text: str, limit: int = 160) -> str:
    """``text`` (a training row's, written by whoever supplied the data) as one Markdown table cell: one line, at
    most ``limit`` characters, Markdown's markup characters escaped so it shows as text (no link, image or HTML)."""
    flat = " ".join(str(text).split())
    flat = flat if len(flat) <= limit else flat[:limit - 1] + "…"
    return _MARKUP.sub(r"\\\g<0>", flat)


def redact(text: str) -> str:
    """``text`` with e-mail addresses, URLs and numbers masked (``show_rows: redacted``)."""
    for pattern, mask in _REDACT:
        text = pattern.sub(mask, text)
    return text


def shown_row(prompt: str, response: str, display: str) -> str:
    """A training row as an approver sees it under the dataset classification's ``display``."""
    if display == "redacted":
        prompt, response = redact(prompt), redact(response)
    return f"{_cell(prompt)} → {_cell(response)}"


def describe_change(request: dict[str, Any]) -> str:
    """What a request changes, in a few words: ``benign → model``, or ``rollback model v2 → v1``."""
    if request.get("change") == "rollback":
        return f"rollback {request['model']} {request['base_version']} → {request['rollback_to']}"
    return f"{request['dataset']} → {request['model']}"


def change_subject(request: dict[str, Any], got: int, needed: int) -> str:
    """The request's subject, key facts first (Airflow's Required Actions list shows the start of it)."""
    return f"[{request['target_environment']} · {got} of {needed} approved] {describe_change(request)}"


def comment_field(params: Any, description: str) -> ParamsDict:
    """``params`` (what Airflow hands the operator: the DAG's params and the task's) with the request's Comment
    field as a task param (the only source HITLOperator keeps), unless the task brings its own."""
    merged = params if isinstance(params, ParamsDict) else ParamsDict(dict(params or {}))
    if "comment" not in merged or merged.get_param("comment").source != "task":
        # optional in Airflow's form (a string field is required there, and an empty one disables both buttons):
        # when a comment is required is the policy's to say, and the gate's to enforce (approval.incomplete)
        merged["comment"] = Param(None, source="task", type=["null", "string"], title="Comment",
                                  description=description)
    return merged


def show_in_airflow(ti: Any, subject: str, body: str, assignees: Sequence[HITLUser]) -> bool:
    """Put a re-opened request's subject, body and assignees into Airflow's HITL row of ``ti`` (its current try).
    Airflow keeps one row per task instance and its execution API only clears the last answer on a re-open, so
    the control plane, which renders each round, writes what the next round shows: the progress, and the
    assignees without those who approved. False when Airflow has no row for it (yet)."""
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        row = session.scalar(
            select(HITLDetail).join(TaskInstance, TaskInstance.id == HITLDetail.ti_id)
            .where(TaskInstance.dag_id == ti.dag_id, TaskInstance.run_id == ti.run_id,
                   TaskInstance.task_id == ti.task_id, TaskInstance.map_index == int(ti.map_index)))
        if row is None:
            return False
        row.subject, row.body = subject, body
        row.assignees = list(assignees)
    return True


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
        # Airflow gives the operator the DAG's params merged in (a DAG with params of its own passes them all), and
        # HITLOperator keeps only those whose source is "task": without a task-sourced Comment, the form has no
        # field and every answer comes without a reason
        kwargs["params"] = comment_field(kwargs.get("params"), "Why you approve or reject: recorded in lineage; the "
                                         "request says when it is required")
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
        # the approvers as the policy and the roles name them now: one taken out since the decision is asked no more
        current = set(people.approvers_now(ti.dag_id))
        withdrawn = sorted(a for a in decision["approvers"] if a not in current and a not in excluded)
        approvers = [a for a in decision["approvers"] if a not in excluded and a in current]
        needed = self._needed(decision)
        if len(approvers) < needed:
            reason = f"not enough eligible approvers for {needed} approval(s)"
            common.record(context, "approval.rejected", {"responder": "policy", "reason": reason, **answered(decision)},
                          actor="policy")
            common.record(context, "approval.decided", {"outcome": "rejected", "reason": reason,
                                                        "tier": decision["tier"]}, actor="policy")
            raise AirflowFailException(f"not enough eligible approvers: tier {decision['tier']} needs {needed}, and "
                                       f"the approver group {decision['approvers']} minus requester/owners "
                                       f"{sorted(excluded)}" + (f" and those no longer approvers {withdrawn}"
                                                                if withdrawn else "") + f" leaves {approvers}")
        req = decision["request"]
        events = common.run_events(context)
        # Quorum progress: who approved this decision already is shown, and is not asked again
        approved: dict[str, dict[str, Any]] = {}
        for grant in answers_to(events, "approval.granted", decision):
            if grant["responder"] in approvers:
                approved.setdefault(grant["responder"], grant)
        waiting = [a for a in approvers if a not in approved]
        subject = change_subject(req, len(approved), needed)
        requests = [e for e in events if e.event_type == "approval.requested"
                    and e.task_id == ti.task_id and e.try_number == int(ti.try_number)]
        now = datetime.now(UTC)
        first = datetime.fromisoformat(requests[0].created_at) if requests and reopen is not None else now
        deadline = first + self.response_timeout if self.response_timeout is not None else None
        remaining: timedelta | None = None
        if reopen is not None and deadline is not None:
            remaining = deadline - now
            if remaining.total_seconds() <= 0:
                self._expired(context, "timeout", f"no quorum before the deadline ({reopen})")
        body = self._summary(context, decision, approvers, approved=list(approved.values()), waiting=waiting,
                             needed=needed, deadline=deadline, note=reopen)
        options = [APPROVE, REJECT]
        shown = request_sha256(subject, body, options)
        common.record(context, "approval.requested", {
            "tier": decision["tier"], "approvers": approvers, "excluded": sorted(excluded), "needed": needed,
            "approved_by": sorted(approved), "assigned": waiting, **({"withdrawn": withdrawn} if withdrawn else {}),
            "round": len(requests) + 1, "policy_sha256": decision["policy_sha256"], **answered(decision),
            "subject": subject, "request_sha256": shown,
            **({"reason": reopen, "remaining_seconds": round(remaining.total_seconds(), 1) if remaining else None}
               if reopen is not None else {"response_timeout_seconds": self.response_timeout.total_seconds()
                                           if self.response_timeout else None}),
        }, actor="policy")
        assignees = people.hitl_users(waiting)  # by the auth manager's user ids, read once for both
        if reopen is not None and common.SERVING and not show_in_airflow(ti, subject, body, assignees):
            self.log.warning("no HITL request of %s in Airflow to show round %d in", ti.task_id, len(requests) + 1)
        return {"subject": subject, "body": body, "options": options,
                "assigned_users": assignees,
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

    def _rows_shown(self, context: Any, decision: dict[str, Any]) -> list[tuple[str, str]]:
        """What the screening found, its first flagged rows and a few sample rows, shown as the dataset's
        classification allows (``approval.show_rows``). Row text is read here, through the control plane's
        screening lease, and is never in lineage: only in the request the approvers see (its hash is)."""
        policy = common.policy()
        display = policy.approval.row_display(decision["classification"])
        found = decision.get("screening")
        rows: list[tuple[str, str]] = []
        flagged: list[int] = []
        if found and found["status"] != "screened":
            rows.append(("Screening", f"not screened: {found['reason']}"))
        elif found:
            base = found.get("base") or {}
            rows.append(("Screening", f"{found['flagged']} of {found['screened']} rows flagged "
                         f"({found['flagged_share']:.0%}) - the row answers a request that "
                         f"{base.get('name', 'the base model')} {base.get('version', '')} refuses ({found['detector']})"
                         + (f"; {found['screened']} of {found['rows']} rows screened (an even sample)"
                            if found["screened"] < found["rows"] else "")))
            flagged = list(found["flagged_ids"][:policy.screening.examples])
        samples = policy.approval.sample_rows
        if display == "none":
            if flagged:
                rows.append(("Flagged rows", f"ids {', '.join(map(str, flagged))} (row text not shown: classification "
                             f"{decision['classification']})"))
            if samples:
                rows.append(("Sample rows", f"not shown (classification {decision['classification']}; policy "
                             "approval.show_rows)"))
            return rows
        if not (flagged or samples) or not decision.get("dataset"):
            return rows
        from airflow_finetune_gov.credentials.operators import service_connection

        table = decision["dataset_table"]
        with service_connection(context, "screen") as conn:
            texts = conn.execute("SELECT id, prompt, response FROM catalog.dataset_rows(%s) WHERE id = ANY(%s) "
                                 "ORDER BY id", (table, flagged)).fetchall() if flagged else []
            spread = conn.execute(
                "SELECT id, prompt, response FROM (SELECT *, row_number() OVER (ORDER BY id) - 1 AS i, "
                "count(*) OVER () AS n FROM catalog.dataset_rows(%s)) r WHERE mod(i, GREATEST(n / %s, 1)) = 0 "
                "ORDER BY id LIMIT %s", (table, samples, samples)).fetchall() if samples else []
        how = " (redacted)" if display == "redacted" else ""
        for row_id, prompt, response in texts:
            rows.append((f"Flagged row {row_id}{how}", shown_row(prompt, response, display)))
        for row_id, prompt, response in spread:
            rows.append((f"Sample row {row_id}{how}", shown_row(prompt, response, display)))
        return rows

    @staticmethod
    def _now_in(request: dict[str, Any]) -> str:
        """Which version of the model the target environment's alias holds now, and who approved it."""
        env = request["target_environment"]
        try:
            from airflow_finetune_gov.registry.store import ModelStore

            root = settings.get("model_store", required=False)
            held = ModelStore(root).aliases(request["model"]).get(env) if root else None
        except Exception as exc:  # the request still opens; the approver is told
            return f"unknown ({type(exc).__name__}: {exc})"
        if not held:
            return f"nothing: {request['model']} has no {env} version in the model store"
        return f"{request['model']} {held['version']}, approved by {held.get('by') or '?'} (run {held.get('run')})"

    @staticmethod
    def _evaluation_row(environment: str) -> str:
        policy = common.policy()
        limits = policy.evaluation
        needs = policy.evaluation_required(environment)
        parts = []
        if "max_harmful_refusal_drop" in limits:
            parts.append(f"harmful refusal may drop at most {limits['max_harmful_refusal_drop'] * 100:g} pts")
        if "min_harmful_refusal" in limits:
            parts.append(f"and must stay at least {limits['min_harmful_refusal']:.0%}")
        if "max_benign_compliance_drop" in limits:
            parts.append(f"benign compliance may drop at most {limits['max_benign_compliance_drop'] * 100:g} pts")
        measured = ", ".join(f"{n} {m.replace('_', ' ')}" for m, n in needs.items())
        return (f"the tuned model is compared with its base before promotion: {'; '.join(parts) or 'policy limits'}; "
                f"it must measure at least {measured} prompts; a regression blocks promotion")

    @staticmethod
    def _needed(decision: dict[str, Any]) -> int:
        return int(decision["quorum"]) if decision["tier"] == "quorum" else 1

    def _summary(self, context: Any, decision: dict[str, Any], approvers: list[str], *,
                 approved: list[dict[str, Any]], waiting: list[str], needed: int, deadline: datetime | None,
                 note: str | None) -> str:
        req = decision["request"]
        ti = context["ti"]
        template = settings.get("lineage_url_template", required=False)
        link = template.format(dag_id=ti.dag_id, run_id=ti.run_id) if template else "(not configured)"
        env = req["target_environment"]
        approval = common.policy().approval
        marks = ", ".join(f"{a['responder']} ✓" + (f" (\u201c{_cell(a['comment'], 80)}\u201d)" if a.get("comment")
                                                    else "") for a in approved)
        left = needed - len(approved)
        status = (f"{len(approved)} of {needed} approved" + (f": {marks}" if marks else "")
                  + f" - waiting for {'another approver' if approved else f'{left} approver(s)'}"
                  + f" ({', '.join(waiting)})")
        commenting = [o for o in (APPROVE, REJECT) if approval.comment_required(o, env)]
        head = [("Status", status)]
        if note and not note.endswith("approvals"):
            head.append(("Asked again", _cell(note, 300)))
        head += [
            ("Answer by", f"{deadline:%Y-%m-%d %H:%M} UTC; no answer by then rejects (fails closed)" if deadline
             else "no deadline"),
            ("Comment", f"required for {' and '.join(commenting)} (an answer without one is not counted)" if commenting
             else "optional; recorded in lineage"),
        ]
        if req.get("change") == "rollback":
            intro = (f"A rollback changes which version of {req['model']} serves {env}. "
                     "Approve only if the version you go back to should serve there again.")
            change_rows = [("Model", req["model"]), ("Alias (environment)", env),
                           ("From version", req["base_version"]), ("To version", req["rollback_to"])]
        else:
            intro = ("A fine-tune can change what the model refuses and whether it can be jailbroken. "
                     "Approve only if you expect this data to be safe for this model and environment.")
            change_rows = [
                ("Why (requester)", _cell(req.get("justification") or "(none given)", 1000)),
                ("Model", f"{req['model']} {req.get('base_version') or ''}".strip()),
                ("Dataset", f"{req['dataset']} (table {decision['dataset_table']})"),
                ("Data owner", decision.get("data_owner") or "(not named in the policy)"),
                *self._data_rows(decision),
                *self._rows_shown(context, decision),
                ("Classification", decision["classification"]),
                ("Target environment", env),
                (f"Now in {env}", self._now_in(req)),
                ("Tuning method", req["tuning_method"]),
                ("Then", self._evaluation_row(env)),
            ]
        rows = [
            *head,
            *change_rows,
            ("Risk tier", f"{decision['tier']} - {'; '.join(decision['reasons'])}"),
            ("Approvals needed", f"{needed} distinct approver(s); one Reject rejects"),
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
        who = responder.get("name") or responder.get("id") or "unknown"  # a name: FAB's ids are row numbers
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
        opened_for = self._asked_approvers(context, decision)
        # one taken out of the approvers since cannot approve
        allowed = opened_for & set(people.approvers_now_of(context, self.log))
        if who not in allowed:
            common.record(context, "approval.violation", {
                **answer, "allowed": sorted(allowed),
                "reason": "responder is no longer an approver (taken out of the policy's approvers after the "
                          "request opened)" if who in opened_for else
                          "responder is the requester, an owner, or not an approver",
            }, actor=who)
            self.log.warning("%s may not answer this approval (separation of duties): recorded as a violation, "
                             "the request stays open", who)
            return self._reopen(context, reason=f"violation by {who}")
        env = decision["request"]["target_environment"]
        if not comment.strip() and common.policy().approval.comment_required(option, env):
            why = "a Reject says why" if option == REJECT else f"every answer about {env} says why"
            common.record(context, "approval.incomplete", {
                **answer, "reason": f"no comment: {why} (policy approval.comment_required)"}, actor=who)
            self.log.warning("%s answered %s without a comment: not counted, the request stays open", who, option)
            return self._reopen(context, reason=f"{who}'s {option} was not counted: it had no comment, and {why}")
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

    def approvers_now(self, context: Any) -> list[str]:
        """The control plane's step of :func:`people.approvers_now_of`: the calling task's run's approvers now."""
        return people.approvers_now(context["ti"].dag_id)

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

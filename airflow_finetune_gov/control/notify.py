"""Notifications and run notes, sent by the control plane as the lineage record says what happened.

What is sent, and to whom:

- ``requested``: each round of an approval request (its ``approval.requested``), to the approvers it assigns,
  with a link to the request in Airflow (its Required Actions page);
- ``reminder``: once per request, ``remind_before`` before its deadline (or half-way, for a shorter one), to the
  approvers still assigned;
- ``review``: an evaluation's ``needs_review`` verdict (its ``evaluation.review_requested``), to the reviewers;
- ``decided``: the request's outcome (``approval.decided``), to the requester;
- ``blocked``: a change stopped after its approval (evaluation failed, promotion refused, the gate bypassed), to
  the requester, and as the run's note in Airflow.

Why here and not in Airflow's HITL ``notifiers``: those run in the task, where DAG code could silence them or send
its own, and where the channels' credentials (an SMTP password, a webhook URL that is its own secret) would be in
every DAG author's reach. The control plane follows the lineage record (``Follower``, a thread) and records what
it sent (``notification.sent`` and ``notification.failed``, which no task can write), so each message goes once,
a failed one is tried again (``ATTEMPTS`` in all), and a restart sends nothing twice. A task's own ``notifiers``
still run, for channels of the DAG's own.

:func:`due` decides what a run's events call for (pure); the channels send it.
"""

from __future__ import annotations

import logging
import smtplib
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, unquote, urlsplit

from airflow_finetune_gov.approval.verify import REJECT, witnessed_answers
from airflow_finetune_gov.lineage.store import EventKey, LineageEvent, by_chain, last_payload

log = logging.getLogger("airflow_finetune_gov.control.notify")
ATTEMPTS = 3  # a message a channel failed to send is tried again at the next polls, this many times in all
# What makes a run worth looking at again (its other events change nothing that is sent)
WATCHED = ("approval.requested", "approval.decided", "evaluation.review_requested", "evaluation.reviewed",
           "evaluation.completed", "promotion.blocked", "rollback.blocked", "lease.refused", "tuning.refused")
# What stops a change after its approval: the first of these in a blocked chain is what its "blocked" message is about
_STOPS = ("promotion.blocked", "rollback.blocked", "lease.refused", "tuning.refused")
_TASK_STOPS = ("lease.refused", "tuning.refused")  # recorded by the task (not reserved): their reason is its text
SENT, FAILED = "notification.sent", "notification.failed"


class NotifyConfigError(ValueError):
    """A notification setting that cannot be used (the message names the option)."""


@dataclass(frozen=True)
class Message:
    kind: str  # requested | reminder | decided | blocked
    about: int  # the lineage event it is about (a reminder: the request's first round)
    key: EventKey  # where its record goes: the chain of the event it is about
    to: tuple[str, ...]  # people (Airflow user names)
    subject: str
    text: str
    link: str
    until: datetime | None = None  # a request's deadline: until then a reminder may come due

    @property
    def full_text(self) -> str:
        return f"{self.text}\n\n{self.link}\n"


def _at(event: LineageEvent) -> datetime:
    return datetime.fromisoformat(event.created_at)


def _key(event: LineageEvent) -> EventKey:
    return EventKey(event.dag_id, event.run_id, event.task_id, event.try_number, event.map_index)


def request_link(base_url: str, event: LineageEvent) -> str:
    """The request in Airflow's UI: its task's Required Actions page."""
    return (f"{base_url.rstrip('/')}/dags/{quote(event.dag_id, safe='')}/runs/{quote(event.run_id, safe=':+')}"
            f"/tasks/{quote(event.task_id, safe='')}/required_actions?map_index={event.map_index}")


def run_link(base_url: str, dag_id: str, run_id: str) -> str:
    """The run in the governance view (its decision, answers, leases, evaluation, promotion)."""
    return f"{base_url.rstrip('/')}/fgov/ui/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


def due(events: Sequence[LineageEvent], *, now: datetime, base_url: str,
        remind_before: timedelta) -> list[Message]:
    """The messages one run's events call for (the newest run under its run id), whether sent already or not."""
    from airflow_finetune_gov.approval.operators import describe_change
    from airflow_finetune_gov.lineage.runs import newest
    from airflow_finetune_gov.plugin import views

    events = newest(events)
    out: list[Message] = []
    summary = {(c["group"], c["map_index"]): c for c in views.summarize(events)["chains"]}
    for chain, evs in by_chain(events).items():
        decided = last_payload(evs, "policy.decided") or {}
        request = decided.get("request") or {}
        requester = request.get("requester")
        change = describe_change(request) if request else ""
        story = summary.get(chain)
        requests = [e for e in evs if e.event_type == "approval.requested"]
        ends = [e for e in evs if e.event_type in ("approval.decided", "approval.expired")]
        latest = requests[-1] if requests else None
        if latest is not None and not any(e.id > latest.id for e in ends):
            p = latest.payload_dict()
            first = next(e for e in requests if e.try_number == latest.try_number)
            timeout = first.payload_dict().get("response_timeout_seconds")
            deadline = _at(first) + timedelta(seconds=timeout) if timeout else None
            lines = [f"{requester} asks you to approve {change} into {request.get('target_environment')}.",
                     f"Tier {p['tier']}: {p['needed']} approval(s) needed; approved so far: "
                     f"{', '.join(p.get('approved_by') or []) or 'nobody'}."]
            if p.get("reason"):
                lines.append(f"Asked again: {p['reason']}.")
            if deadline is not None:
                lines.append(f"Answer by {deadline.strftime('%Y-%m-%d %H:%M UTC')}; no answer rejects the change.")
            assigned = tuple(p.get("assigned") or ())
            word = "Approval requested" if p["round"] == 1 else "Approval still needed"
            link = request_link(base_url, latest)
            out.append(Message("requested", latest.id, _key(latest), assigned, f"{word}: {p.get('subject') or change}",
                               "\n".join(lines), link, until=deadline))
            if deadline is not None and timeout and story and story["approval"] == "pending":
                lead = min(remind_before, timedelta(seconds=float(timeout) / 2))
                if deadline - lead <= now < deadline:
                    left = max(int((deadline - now).total_seconds() // 60), 0)
                    out.append(Message(
                        "reminder", first.id, _key(first), assigned,
                        f"Reminder: {p.get('subject') or change} expires {deadline.strftime('%H:%M UTC')}",
                        f"{requester}'s change {change} still waits for you. It expires in {left} min "
                        f"({deadline.strftime('%Y-%m-%d %H:%M UTC')}); no answer rejects it.", link))
        review = next((e for e in reversed(evs) if e.event_type == "evaluation.review_requested"), None)
        if review is not None and not any(e.event_type == "evaluation.reviewed" and e.id > review.id for e in evs):
            p = review.payload_dict()
            out.append(Message(
                "review", review.id, _key(review), tuple(p.get("reviewers") or ()),
                f"Evaluation needs review: {change} ({request.get('target_environment')})",
                f"The candidate of {requester}'s change {change} needs a reviewer's decision before promotion: "
                f"undecided {', '.join(p.get('undecided') or []) or '-'}. No answer blocks the promotion.",
                request_link(base_url, review)))
        outcome = next((e for e in reversed(evs) if e.event_type == "approval.decided"), None)
        told = _outcome(evs, outcome) if outcome is not None and requester else None
        if outcome is not None and told is not None and requester:
            verdict, why = told
            lines = [f"Your change {change} ({request.get('target_environment')}) was {verdict}: {why}."]
            said = [e.payload_dict() for e in witnessed_answers(evs) if e.id < outcome.id]
            lines += [f"- {a.get('responder')}: \u201c{a['comment']}\u201d" if a.get("comment")
                      else f"- {a.get('responder')}" for a in said]
            out.append(Message("decided", outcome.id, _key(outcome), (requester,),
                               f"{verdict.capitalize()}: {change} ({request.get('target_environment')})",
                               "\n".join(lines), run_link(base_url, outcome.dag_id, outcome.run_id)))
        if story is not None and requester and views.chain_blocked(story) and story["approval"] != "rejected" \
                and story["tier"] != "deny":
            trigger = next((e for e in evs if e.event_type in _STOPS or (
                e.event_type == "evaluation.completed" and e.payload_dict().get("verdict") == "fail")), None)
            if trigger is not None:
                # a refusal the task recorded says what the task wrote: it is not repeated in a message or a note
                why = story["reason"] if trigger.event_type not in _TASK_STOPS else \
                    "a credential or the tuning was refused (the run's governance page shows the refusal)"
                out.append(Message("blocked", trigger.id, _key(trigger), (requester,),
                                   f"Blocked: {change} ({request.get('target_environment')})",
                                   f"Your change {change} was not promoted: {why}.",
                                   run_link(base_url, trigger.dag_id, trigger.run_id)))
    return out


def _outcome(evs: Sequence[LineageEvent], decided: LineageEvent) -> tuple[str, str] | None:
    """What the requester is told of a decided request, from what no task can write: the gate's
    ``approval.decided`` (a task's record) says only when to tell. Approved only where the record proves the
    approval (``granted_approval``: witnessed answers to the decision); rejected by whoever the api-server saw
    reject, else in the gate's own fixed words; a forged outcome with free text is told as nothing or as a plain
    rejection, never in its words."""
    from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval

    claimed, reason = decided.payload_dict().get("outcome"), str(decided.payload_dict().get("reason") or "")
    if claimed == "approved":
        try:
            proof = granted_approval(list(evs), decided.run_id)
        except ApprovalMissing:
            return None  # not proved: nothing is said
        return "approved", f"approved by {', '.join(proof['approvers']) or 'the policy'}"
    if claimed != "rejected":
        return None
    rejecters = [p.get("responder") for e in witnessed_answers(evs) if e.id < decided.id
                 and REJECT in (p := e.payload_dict()).get("chosen_options", [])]
    if rejecters:
        return "rejected", f"rejected by {rejecters[-1]}"
    for fixed in ("expired", "not enough eligible approvers"):  # the gate's own reasons, not a task's free text
        if reason.startswith(fixed):
            return "rejected", fixed
    return "rejected", "no approval"


class Channel(Protocol):
    name: str
    kinds: frozenset[str] | None  # the kinds of message it takes (None: every kind)

    def send(self, message: Message) -> list[str]:
        """Send ``message``; return where it went (addresses, a host), or raise."""


class Email:
    """SMTP (``smtp://[user:password@]host[:port][?starttls=true]`` or ``smtps://``), one message per notification
    to every recipient's address (``address`` turns a user name into one: ``{user}@example.com``; a user name that
    is an address is used as it is)."""

    name = "email"
    kinds: frozenset[str] | None = None

    def __init__(self, url: str, sender: str, address: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("smtp", "smtps") or not parts.hostname:
            raise NotifyConfigError(f"[finetune_gov] notify_smtp_url {_redacted(url)!r}: use "
                                    "smtp://[user:password@]host[:port][?starttls=true] or smtps://...")
        if not sender or "@" not in sender:
            raise NotifyConfigError("[finetune_gov] notify_from must be an e-mail address (the sender) when "
                                    "notify_smtp_url is set")
        if "{user}" not in address:
            raise NotifyConfigError(f"[finetune_gov] notify_address_template {address!r} must hold {{user}} "
                                    "(e.g. {user}@example.com)")
        self.tls = parts.scheme == "smtps"
        self.starttls = parse_qs(parts.query).get("starttls", ["false"])[0].lower() in ("1", "true", "yes")
        self.host, self.port = parts.hostname, parts.port or (465 if self.tls else 25)
        self.user = unquote(parts.username) if parts.username else None
        self._password = unquote(parts.password) if parts.password else None
        self.sender, self.template = sender, address

    def address(self, user: str) -> str:
        return user if "@" in user else self.template.replace("{user}", user)

    def send(self, message: Message) -> list[str]:
        to = [self.address(u) for u in message.to]
        if not to:
            return []
        mail = EmailMessage()
        mail["From"], mail["To"], mail["Subject"] = self.sender, ", ".join(to), message.subject
        mail["X-Fgov-Kind"] = message.kind
        mail.set_content(message.full_text)
        smtp_class = smtplib.SMTP_SSL if self.tls else smtplib.SMTP
        with smtp_class(self.host, self.port, timeout=20) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.user:
                smtp.login(self.user, self._password or "")
            smtp.send_message(mail)
        return to


class Webhook:
    """A Slack-compatible incoming webhook: ``POST {"text": ...}`` (Slack, Mattermost, Rocket.Chat and Teams'
    Slack-compatible connectors take it). The URL is a secret: it is never logged or recorded."""

    name = "webhook"
    kinds: frozenset[str] | None = None

    def __init__(self, url: str) -> None:
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise NotifyConfigError("[finetune_gov] notify_webhook_url must be an http(s) URL (a Slack-compatible "
                                    "incoming webhook)")
        self._url = url
        self.host = urlsplit(url).hostname or ""

    def send(self, message: Message) -> list[str]:
        people = ", ".join(message.to)
        text = f"*{message.subject}*\n{message.text}" + (f"\nFor: {people}" if people else "") + \
            f"\n<{message.link}|Open in Airflow>"
        import requests

        body = {"text": text, "fgov": {"kind": message.kind, "to": list(message.to), "link": message.link}}
        try:
            answer = requests.post(self._url, json=body, timeout=20)
        except requests.RequestException as exc:  # its message holds the URL (a secret): only its class goes on
            raise OSError(f"webhook on {self.host}: {exc.__class__.__name__}") from None
        if not 200 <= answer.status_code < 300:
            raise OSError(f"webhook on {self.host} answered {answer.status_code}")
        return [self.host]


class RunNote:
    """The run's note in Airflow (the control plane writes it through Airflow's metadata database): a blocked
    change says why on the run itself. A note someone wrote is kept, with this one after it."""

    name = "airflow-note"
    kinds: frozenset[str] | None = frozenset({"blocked"})
    MARK = "airflow-finetune-gov:"

    def send(self, message: Message) -> list[str]:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select

        note = f"{self.MARK} {message.text}\n{message.link}"
        with create_session() as session:
            run = session.scalar(select(DagRun).where(DagRun.dag_id == message.key.dag_id,
                                                      DagRun.run_id == message.key.run_id))
            if run is None:
                raise LookupError(f"no run {message.key.dag_id}/{message.key.run_id} in Airflow")
            current = str(run.note or "")
            kept = current.split(self.MARK)[0].rstrip() if self.MARK in current else current.rstrip()
            run.note = f"{kept}\n\n{note}" if kept else note
        return [f"{message.key.dag_id}/{message.key.run_id}"]


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    return url.replace(parts.password, "***") if parts.password else url


def channels_from_settings() -> list[Channel]:
    """The configured channels: e-mail and the webhook when set, the run note always."""
    from airflow_finetune_gov import settings

    out: list[Channel] = []
    smtp = settings.get("notify_smtp_url", required=False)
    if smtp:
        out.append(Email(smtp, settings.get("notify_from", required=False),
                         settings.get("notify_address_template", required=False)))
    hook = settings.get("notify_webhook_url", required=False)
    if hook:
        out.append(Webhook(hook))
    out.append(RunNote())
    return out


class Follower(threading.Thread):
    """Reads new lineage events every ``poll`` seconds; for each run they touch (and each run with a request still
    open: its reminder), sends what :func:`due` says is due on each channel, and records it."""

    def __init__(self, store: Any, record: Callable[..., Any], channels: Sequence[Channel], *, base_url: str,
                 remind_before: timedelta, poll: float, lookback: timedelta = timedelta(days=1),
                 asking: Callable[[EventKey], bool] = lambda _key: True) -> None:
        super().__init__(name="fgov-notify", daemon=True)
        self.store, self.record, self.channels, self.asking = store, record, list(channels), asking
        self.base_url, self.remind_before, self.poll = base_url, remind_before, poll
        self._open: set[tuple[str, str]] = set()
        self._cursor = 0
        self._since = datetime.now(UTC) - lookback
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                self.tick()
            except Exception:  # the next poll tries again; a notification never stops the control plane
                log.exception("notifications: this poll failed")
            self.stopped.wait(self.poll)

    def tick(self, now: datetime | None = None) -> int:
        """One poll; returns how many messages went out."""
        now = now or datetime.now(UTC)
        # a little behind the newest seen: an event numbered before it may commit after it (what was sent is
        # recorded, so reading one again sends nothing twice)
        new = self.store.events(event_types=WATCHED, after_id=max(self._cursor - 16, 0), since=self._since.isoformat())
        if new:
            self._cursor = max(e.id for e in new)
        runs = {(e.dag_id, e.run_id) for e in new} | self._open
        sent = 0
        for dag_id, run_id in sorted(runs):
            events = self.store.events(dag_id=dag_id, run_id=run_id)
            messages = [m for m in due(events, now=now, base_url=self.base_url,
                                       remind_before=self.remind_before)
                        if m.kind != "reminder" or self.asking(m.key)]  # not for a request Airflow ended
            done: dict[tuple[str, int, str], int] = {}
            for e in events:
                if e.event_type in (SENT, FAILED):
                    p = e.payload_dict()
                    k = (p["kind"], p["about"], p["channel"])
                    done[k] = ATTEMPTS if e.event_type == SENT else done.get(k, 0) + 1
            retry = False  # a send failed and has tries left
            for message in messages:
                for channel in self.channels:
                    tries = done.get((message.kind, message.about, channel.name), 0)
                    if tries >= ATTEMPTS or (channel.kinds is not None and message.kind not in channel.kinds):
                        continue
                    delivered = self._send(channel, message)
                    sent += delivered is True
                    retry = retry or (delivered is None and tries + 1 < ATTEMPTS)
            if retry or any(m.until is not None and now < m.until for m in messages):
                self._open.add((dag_id, run_id))  # a reminder may come due, or a send be tried again
            else:
                self._open.discard((dag_id, run_id))
        return sent

    def _record(self, key: EventKey, event_type: str, payload: dict[str, Any]) -> None:
        from airflow_finetune_gov.lineage import events

        events.check(event_type, payload)
        self.record(key, event_type, actor="control-plane", payload=payload)

    def _send(self, channel: Channel, message: Message) -> bool | None:
        """Send ``message`` on ``channel`` and record it: True when it went out, False when it had nobody to go to
        (a round with nobody assigned), None when it failed."""
        base = {"kind": message.kind, "about": message.about, "channel": channel.name}
        try:
            where = channel.send(message)
        except Exception as exc:
            log.warning("notification %s about event %s on %s failed: %s", message.kind, message.about,
                        channel.name, exc)
            self._record(message.key, FAILED, {**base, "error": f"{exc.__class__.__name__}: {str(exc)[:300]}"})
            return None
        if not where:  # nobody to send it to
            self._record(message.key, SENT, {**base, "to": [], "delivered_to": []})
            return False
        self._record(message.key, SENT, {**base, "to": list(message.to), "delivered_to": where,
                                         "subject": message.subject, "link": message.link})
        log.info("notification %s about event %s sent on %s to %s", message.kind, message.about, channel.name,
                 ", ".join(message.to) or "-")
        return True


def awaiting_input(key: EventKey) -> bool:
    """Whether Airflow's task instance of ``key`` still waits for an answer (a run marked failed, or a gate marked
    success, ended the request without a decision in lineage: nobody is reminded of it)."""
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        state = session.scalar(select(TaskInstance.state).where(
            TaskInstance.dag_id == key.dag_id, TaskInstance.run_id == key.run_id, TaskInstance.task_id == key.task_id,
            TaskInstance.map_index == key.map_index))
    return getattr(state, "value", state) in ("awaiting_input", "deferred")


def start(store: Any, record: Callable[..., Any]) -> Follower:
    """The control plane's follower, with the configured channels (raises ``NotifyConfigError`` naming the option
    when one cannot be used: the control plane then does not start)."""
    from airflow.configuration import conf

    from airflow_finetune_gov import settings

    channels = channels_from_settings()
    base_url = conf.get("api", "base_url", fallback="") or ""
    if not base_url.startswith(("http://", "https://")) and any(c.name != RunNote.name for c in channels):
        raise NotifyConfigError(f"[api] base_url is {base_url!r} in the control plane's configuration: notifications "
                                "link to Airflow's UI, so set it to the address people open (https://airflow...)")
    follower = Follower(store, record, channels, base_url=base_url, asking=awaiting_input,
                        remind_before=timedelta(seconds=float(settings.get("notify_remind_before_seconds"))),
                        poll=float(settings.get("notify_poll_seconds")))
    follower.start()
    log.info("notifications: %s, every %.0f s", ", ".join(c.name for c in channels), follower.poll)
    return follower

"""Notifications: what a run's lineage calls for (pure logic, on a SQLite lineage store), and the follower sending
it on the real channels to real local servers (aiosmtpd, an HTTP receiver), once each, and recording it. The run
note and the whole flow on the stack are in tests/integration/test_approval_gate.py."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import payloads
import pytest
from receivers import Mailbox, WebhookReceiver, free_port

from airflow_finetune_gov.control import notify
from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.lineage.store import Base, EventKey, LineageStore

BASE = "http://airflow.example:8080"


@pytest.fixture
def store(tmp_path) -> LineageStore:
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    Base.metadata.create_all(s.engine)
    return s


def rec(store: LineageStore, task: str, kind: str, payload: dict[str, Any], run: str = "manual__1+00:00") -> Any:
    return events.record(store, EventKey("d", run, task, 1), kind, actor="t", payload=payload)


def opened(store: LineageStore, env: str = "production", **fields: Any) -> tuple[dict[str, Any], Any]:
    d = payloads.decision(env)
    rec(store, "policy_check", "policy.decided", d)
    request = rec(store, "approval_gate", "approval.requested", payloads.requested(
        d, subject=f"[{env} · 0 of 2 approved] benign → m", approvers=["approver1", "approver2"],
        assigned=["approver1", "approver2"], approved_by=[], response_timeout_seconds=600, **fields))
    return d, request


def due(store: LineageStore, now: datetime | None = None) -> list[notify.Message]:
    evs = store.events(dag_id="d")
    return notify.due(evs, now=now or datetime.fromisoformat(evs[-1].created_at), base_url=BASE,
                      remind_before=timedelta(hours=1))


def test_an_open_request_asks_its_assigned_approvers_with_a_link_and_reminds_them_before_it_expires(
        store: LineageStore) -> None:
    _d, request = opened(store)
    (message,) = due(store)
    assert (message.kind, message.about, message.to) == ("requested", request.id, ("approver1", "approver2"))
    assert message.subject == "Approval requested: [production · 0 of 2 approved] benign → m"
    assert message.link == f"{BASE}/dags/d/runs/manual__1+00:00/tasks/approval_gate/required_actions?map_index=-1"
    assert "requester asks you to approve benign → " in message.text and "Answer by" in message.text
    # a 10-minute request is reminded of half-way before its deadline (an hour's lead is longer than it)
    at = datetime.fromisoformat(request.created_at)
    assert [m.kind for m in due(store, at + timedelta(seconds=299))] == ["requested"]
    kinds = [(m.kind, m.about, m.to) for m in due(store, at + timedelta(seconds=301))]
    assert kinds == [("requested", request.id, ("approver1", "approver2")),
                     ("reminder", request.id, ("approver1", "approver2"))]
    assert [m.kind for m in due(store, at + timedelta(seconds=601))] == ["requested"]  # past it: no reminder


def test_the_next_round_asks_those_still_waiting_and_the_outcome_goes_to_the_requester(store: LineageStore) -> None:
    d, _first = opened(store)
    rec(store, "approval_gate", "approval.witnessed", payloads.witnessed("approver1", comment="data reviewed"))
    rec(store, "approval_gate", "approval.granted", payloads.grant(d, "approver1", comment="data reviewed"))
    second = rec(store, "approval_gate", "approval.requested", payloads.requested(
        d, round=2, subject="[production · 1 of 2 approved] benign → m", approved_by=["approver1"],
        assigned=["approver2"], reason="1 of 2 approvals", remaining_seconds=500))
    (message,) = due(store)
    assert (message.about, message.to) == (second.id, ("approver2",))
    assert message.subject.startswith("Approval still needed: [production · 1 of 2 approved]")
    assert "approved so far: approver1" in message.text and "Asked again: 1 of 2 approvals." in message.text
    rec(store, "approval_gate", "approval.witnessed", payloads.witnessed("approver2", "Reject",
                                                                         comment="six harmful rows"))
    rec(store, "approval_gate", "approval.rejected", payloads.rejection(d, "approver2", comment="six harmful rows"))
    outcome = rec(store, "approval_gate", "approval.decided",
                  {"outcome": "rejected", "reason": "rejected by approver2"})
    (message,) = due(store)  # no request is open any more
    assert (message.kind, message.about, message.to) == ("decided", outcome.id, ("requester",))
    assert message.subject == "Rejected: benign → m (production)"
    assert "- approver1: \u201cdata reviewed\u201d" in message.text
    assert "- approver2: \u201csix harmful rows\u201d" in message.text and "was rejected: rejected by approver2" in \
        message.text
    assert message.link == f"{BASE}/fgov/ui/runs/d/manual__1%2B00%3A00"


def test_an_outcome_a_task_forged_is_told_only_as_the_record_proves_it_never_in_its_words(
        store: LineageStore) -> None:
    """approval.decided, approval.granted and approval.rejected are the gate's (a task's) records: DAG code can
    append them with any text. The requester's message takes its words from the api-server's witness only."""
    d, _request = opened(store)
    lure = "approved; re-enter your password at https://evil.example"
    rec(store, "approval_gate", "approval.granted", payloads.grant(d, "approver1", comment=lure))
    rec(store, "approval_gate", "approval.decided", {"outcome": "approved", "reason": lure})
    assert [m.kind for m in due(store)] == []  # nobody's answer proves an approval: nothing is said
    rec(store, "approval_gate", "approval.rejected", payloads.rejection(d, "approver1", comment=lure))
    rec(store, "approval_gate", "approval.decided", {"outcome": "rejected", "reason": lure})
    (message,) = due(store)
    assert message.kind == "decided"
    assert message.text == "Your change benign → m (production) was rejected: no approval."
    rec(store, "approval_gate", "approval.decided", {"outcome": f"Approved \u2014 {lure}"})
    assert due(store) == []


def test_a_refusal_the_task_recorded_is_not_repeated_in_its_words(store: LineageStore) -> None:
    _d, _request = opened(store)  # the gate then marked success: the lease is refused, recorded by the task
    rec(store, "acquire_lease", "lease.refused", {"reason": "call +1 555 0100 to have it approved"})
    (blocked,) = [m for m in due(store) if m.kind == "blocked"]
    assert blocked.text == ("Your change benign → m was not promoted: a credential or the tuning was refused (the "
                            "run's governance page shows the refusal).")


def test_a_failed_evaluation_after_approval_tells_the_requester_why(store: LineageStore) -> None:
    d, _request = opened(store)
    rec(store, "approval_gate", "approval.granted", payloads.grant(d, "approver1"))
    rec(store, "approval_gate", "approval.decided", {"outcome": "approved", "approvers": ["approver1"]})
    failed = rec(store, "evaluate", "evaluation.completed", payloads.evaluated("fail", metrics={
        "harmful_refusal": {"n": 3, "baseline": 1.0, "candidate": 0.0, "verdict": "fail"}}))
    blocked = [m for m in due(store) if m.kind == "blocked"]
    assert [(m.about, m.to) for m in blocked] == [(failed.id, ("requester",))]
    assert "blocked by evaluation: harmful_refusal \u2212100 pts" in blocked[0].text


def test_the_follower_sends_each_message_once_on_each_channel_and_records_it(
        store: LineageStore, mailbox: Mailbox, webhook: WebhookReceiver) -> None:
    class BlockedOnly:  # a channel for one kind (as the run note is): the others are not offered, nor recorded
        name, kinds, got = "blocked-only", frozenset({"blocked"}), []

        def send(self, message: notify.Message) -> list[str]:
            self.got.append(message)
            return ["x"]

    only = BlockedOnly()
    channels = [notify.Email(mailbox.url, "fgov@example.org", "{user}@example.org"), notify.Webhook(webhook.url), only]
    follower = notify.Follower(store, store.record, channels, base_url=BASE, remind_before=timedelta(hours=1),
                               poll=1)
    mails, posts = len(mailbox.messages), len(webhook.posts)
    _d, request = opened(store)
    assert follower.tick() == 2
    assert follower.tick() == 0  # sent already: recorded, so not again
    (to, mail), = mailbox.messages[mails:]
    assert sorted(to) == ["approver1@example.org", "approver2@example.org"]
    assert mail["Subject"] == "Approval requested: [production · 0 of 2 approved] benign → m"
    assert mail["From"] == "fgov@example.org" and mail["X-Fgov-Kind"] == "requested"
    assert "/tasks/approval_gate/required_actions?map_index=-1" in mail.get_content()
    (post,) = webhook.posts[posts:]
    assert post["fgov"] == {"kind": "requested", "to": ["approver1", "approver2"], "link": notify.request_link(
        BASE, request)}
    assert post["text"].startswith("*Approval requested: [production") and "|Open in Airflow>" in post["text"]
    sent = [e.payload_dict() for e in store.events(event_type="notification.sent")]
    assert [(s["channel"], s["about"], s["delivered_to"]) for s in sent] == [
        ("email", request.id, ["approver1@example.org", "approver2@example.org"]), ("webhook", request.id,
                                                                                  ["127.0.0.1"])]
    assert all(webhook.token not in e.payload for e in store.events())  # the webhook URL is a secret
    assert only.got == []


def test_nobody_is_reminded_of_a_request_airflow_no_longer_waits_on(store: LineageStore,
                                                                    webhook: WebhookReceiver) -> None:
    ended: list[EventKey] = []

    def asking(key: EventKey) -> bool:
        ended.append(key)
        return False  # the run was marked failed while the request was open

    follower = notify.Follower(store, store.record, [notify.Webhook(webhook.url)], base_url=BASE,
                               remind_before=timedelta(hours=1), poll=1, asking=asking)
    _d, request = opened(store)
    assert follower.tick(now=datetime.fromisoformat(request.created_at) + timedelta(seconds=400)) == 1  # requested
    sent = [e.payload_dict()["kind"] for e in store.events(event_type="notification.sent")]
    assert sent == ["requested"] and ended == [EventKey("d", "manual__1+00:00", "approval_gate", 1)]


def test_a_run_is_followed_for_its_reminder_until_the_deadline_and_no_longer(store: LineageStore,
                                                                             webhook: WebhookReceiver) -> None:
    follower = notify.Follower(store, store.record, [notify.Webhook(webhook.url)], base_url=BASE,
                               remind_before=timedelta(hours=1), poll=1)
    _d, request = opened(store)  # a 10-minute request nobody answers, and the gate never records an end
    at = datetime.fromisoformat(request.created_at)
    assert follower.tick(now=at) == 1 and follower._open == {("d", "manual__1+00:00")}
    assert follower.tick(now=at + timedelta(seconds=301)) == 1  # the reminder: the run was still followed
    assert follower.tick(now=at + timedelta(seconds=601)) == 0 and follower._open == set()


def test_a_channel_that_fails_is_recorded_and_tried_three_times_in_all(
        store: LineageStore, webhook: WebhookReceiver) -> None:
    follower = notify.Follower(store, store.record, [notify.Webhook(webhook.url)], base_url=BASE,
                               remind_before=timedelta(hours=1), poll=1)
    webhook.status = 500
    try:
        opened(store)
        for _ in range(5):
            assert follower.tick() == 0
    finally:
        webhook.status = 200
    failed = [e.payload_dict() for e in store.events(event_type="notification.failed")]
    assert [f["error"] for f in failed] == ["OSError: webhook on 127.0.0.1 answered 500"] * 3
    assert store.events(event_type="notification.sent") == []
    assert all(webhook.token not in e.payload for e in store.events())


def test_an_unreachable_smtp_server_is_a_failure_recorded_not_a_crash(store: LineageStore) -> None:
    closed = free_port()
    follower = notify.Follower(store, store.record, [notify.Email(f"smtp://u:pw-secret@127.0.0.1:{closed}",
                                                                  "fgov@example.org", "{user}@example.org")],
                               base_url=BASE, remind_before=timedelta(hours=1), poll=1)
    opened(store)
    assert follower.tick() == 0
    (failed,) = [e.payload_dict() for e in store.events(event_type="notification.failed")]
    assert failed["channel"] == "email" and "ConnectionRefusedError" in failed["error"]
    assert all("pw-secret" not in e.payload for e in store.events())


@pytest.mark.parametrize(("url", "sender", "template", "names"), [
    ("mail.example.com:25", "a@b", "{user}@b", "notify_smtp_url"),
    ("smtp://u:secret@", "a@b", "{user}@b", "notify_smtp_url"),
    ("smtp://mail.example.com", "", "{user}@b", "notify_from"),
    ("smtp://mail.example.com", "a@b", "everyone@b", "notify_address_template"),
])
def test_email_settings_that_cannot_work_are_refused_naming_the_option(url: str, sender: str, template: str,
                                                                       names: str) -> None:
    with pytest.raises(notify.NotifyConfigError, match=names) as caught:
        notify.Email(url, sender, template)
    assert "secret" not in str(caught.value)


def test_a_webhook_that_is_not_http_is_refused() -> None:
    with pytest.raises(notify.NotifyConfigError, match="notify_webhook_url"):
        notify.Webhook("file:///etc/passwd")

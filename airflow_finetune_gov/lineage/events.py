"""Every lineage event type, defined once: who records it, what it means, and its payload's fields
(pure; no Airflow import).

Writers go through :func:`record`, which refuses an unknown event type, a missing field and (for
closed payloads) a field that is not defined here, so renaming a key in an operator fails loudly
instead of silently breaking the readers (approval checks, the evidence pack, the governance view).
Readers compare ``event_type`` with these names; each :class:`EventType` *is* its name (a ``str``).
Tests build payloads with :meth:`EventType.payload`, checked against the same definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from airflow_finetune_gov.lineage.store import EventKey, LineageEvent, LineageStore


class EventSchemaError(ValueError):
    """A payload that does not match its event type's definition (a bug in the writer, never data)."""


class EventType(str):
    """An event type: its name, who records it, what it means, and its payload's fields.

    ``required`` fields must be present (``None`` allowed); ``optional`` ones may be; any other field
    is refused unless ``open`` (payloads built from a record defined elsewhere: a policy decision, a
    comparison's metrics, a tuning job's figures)."""

    by: str
    means: str
    required: frozenset[str]
    optional: frozenset[str]
    open: bool
    reserved: bool  # written by the deployment's own components only: the control plane refuses it from a task

    def __new__(cls, name: str, by: str, means: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = (),
                *, open: bool = False, reserved: bool = False) -> EventType:
        self = super().__new__(cls, name)
        self.by, self.means, self.open, self.reserved = by, means, open, reserved
        self.required, self.optional = frozenset(required), frozenset(optional)
        return self

    def check(self, payload: Mapping[str, Any]) -> None:
        missing = sorted(self.required - set(payload))
        unknown = [] if self.open else sorted(set(payload) - self.required - self.optional)
        if missing or unknown:
            raise EventSchemaError(
                f"lineage event {self}: " + "; ".join(
                    ([f"missing {missing}"] if missing else []) + ([f"fields not defined for it {unknown}"]
                                                                   if unknown else []))
                + " (airflow_finetune_gov/lineage/events.py defines each event type's fields)")

    def payload(self, **fields: Any) -> dict[str, Any]:
        """A payload of this type, checked (for tests and writers that build one field by field)."""
        self.check(fields)
        return fields


# What an answer through Airflow's HITL form records (approval gate).
_ANSWER = ("responder", "option", "comment", "responded_at", "decision_id", "decision_sha256")
# A lease as the broker issued it, without its wrapping token (credentials.broker.IssuedLease.public).
_ISSUED = ("lease_id", "db_role", "lease_duration", "requested_ttl", "renewable", "token_accessor", "wrap_accessor",
           "wrap_token_sha256")
_DECISION = ("tier", "reasons", "policy_name", "policy_sha256", "approvers", "quorum", "classification",
             "dataset_table", "rule_line", "request", "dataset", "hyperparameters", "decision_id", "decision_sha256")

RUN_STARTED = EventType(
    "run.started", "the scheduler (the provider's listener)",
    "a DAG run started running (first start, or a finished run cleared): Airflow's key of the run and its start",
    ("dag_run_id", "start_date"), ("clear_number", "run_type", "triggering_user_name", "run_after"), reserved=True)

RUN_REQUESTED = EventType(
    "run.requested", "the api-server (the provider's root middleware)",
    "a user triggered the run through Airflow's API: who, as Airflow authenticated them (the requester)",
    ("triggering_user_name", "run_type"), reserved=True)

POLICY_DECIDED = EventType(
    "policy.decided", "the control plane (policy check, rollback check)",
    "the policy's decision about the change, sealed by its decision_sha256", _DECISION, open=True, reserved=True)
POLICY_ERROR = EventType("policy.error", "policy check", "the change could not be decided (nobody is asked)",
                         ("error",), open=True)

DATASET_SCREENED = EventType(
    "dataset.screened", "the control plane (policy check)",
    "the training rows were screened before anyone was asked: how many the base model refuses and the row answers "
    "anyway (flagged), by row id; never row text",
    ("dataset", "table", "sha256", "status", "method", "rows", "screened", "flagged", "flagged_share", "flagged_ids",
     "base_refused", "detector", "base", "reason"), reserved=True)

APPROVAL_REQUESTED = EventType(
    "approval.requested", "the control plane (approval gate)",
    "a request for approval of one decision rendered from it and opened (or re-opened: round n); request_sha256 "
    "names what the approvers are shown (verify.request_sha256)",
    ("tier", "needed", "round", "policy_sha256", "decision_id", "decision_sha256", "request_sha256"),
    ("approvers", "excluded", "approved_by", "assigned", "subject", "response_timeout_seconds", "reason",
     "remaining_seconds", "withdrawn"), reserved=True)
APPROVAL_WITNESSED = EventType(
    "approval.witnessed", "the api-server (the provider's root middleware)",
    "Airflow accepted an answer to a HITL request through its API, from this authenticated user: the only "
    "proof that a person answered", ("responder", "chosen_options", "responded_at"),
    ("responder_id", "comment", "request_sha256", "subject", "try_number"),
    reserved=True)
APPROVAL_GRANTED = EventType(
    "approval.granted", "approval gate", "one approval of one decision, by a person or (tier auto) the policy",
    ("approval_id", "responder", "option", "tier", "policy_sha256", "decision_id", "decision_sha256"),
    ("comment", "responded_at"))
APPROVAL_REJECTED = EventType(
    "approval.rejected", "approval gate", "the decision was rejected (one Reject rejects)",
    ("responder", "decision_id", "decision_sha256"), ("option", "comment", "responded_at", "reason", "tier"))
APPROVAL_DUPLICATE = EventType("approval.duplicate", "approval gate", "an approver answered twice: counted once",
                               (*_ANSWER, "approved_by"))
APPROVAL_INCOMPLETE = EventType(
    "approval.incomplete", "approval gate",
    "an answer the policy requires a comment for came without one: not counted, the request stays open",
    (*_ANSWER, "reason"))
APPROVAL_VIOLATION = EventType(
    "approval.violation", "approval gate", "someone not allowed to approve answered (separation of duties)",
    (*_ANSWER, "allowed", "reason"))
APPROVAL_SUPERSEDED = EventType(
    "approval.superseded", "approval gate", "an answer to a decision that changed while the request was open",
    (*_ANSWER, "asked_decision_sha256", "reason"))
APPROVAL_EXPIRED = EventType("approval.expired", "approval gate", "nobody answered in time (fails closed)",
                             ("error_type", "error"))
APPROVAL_DECIDED = EventType("approval.decided", "approval gate", "the request's outcome: approved or rejected",
                             ("outcome",), ("reason", "tier", "approvers"))

LEASE_REQUESTED = EventType(
    "lease.requested", "lease broker", "a credential lease was asked for, with its TTL",
    ("purpose", "ttl_seconds", "vault_role"),
    ("dataset", "approval_id", "decision_sha256", "lease_number", "max_leases_per_approval",
     "expected_duration_seconds"))
LEASE_ISSUED = EventType(
    "lease.issued", "lease broker", "dynamic database credentials were issued (never the password)",
    (*_ISSUED, "purpose", "dataset", "expires_at"),
    ("dataset_table", "approved_sha256", "approval_id", "decision_sha256", "lease_number", "handover"))
LEASE_REFUSED = EventType(
    "lease.refused", "lease broker", "no lease: no approval, another kind of change, bad duration, or the limit",
    ("reason",), ("purpose", "dataset", "approval_id", "decision_sha256", "leases_issued", "limit", "earlier_leases"))
LEASE_FAILED = EventType("lease.failed", "lease broker", "OpenBao could not issue the lease (retryable)",
                         ("error",), ("dataset",))
LEASE_HANDOVER_FAILED = EventType("lease.handover_failed", "tuning", "the tuning task could not take its credentials",
                                  ("lease_id", "error"))
LEASE_RENEWED = EventType("lease.renewed", "tuning", "a lease was renewed while the job ran",
                          ("lease_id", "ttl_seconds", "expires_at"))
LEASE_REVOKED = EventType(
    "lease.revoked", "lease broker, sweep", "a lease, its token and its hand-over were revoked",
    ("lease_id", "db_role", "reason"), ("attempts", "token_revoked", "handover_cleared"))
LEASE_REVOKE_FAILED = EventType("lease.revoke_failed", "lease broker, sweep", "a revocation failed (the sweep retries)",
                                ("lease_id", "db_role", "reason", "error"), ("attempts",))
LEASE_VERIFIED = EventType("lease.verified", "lease broker, sweep",
                           "PostgreSQL shows the leased role and its sessions gone",
                           ("lease_id", "db_role", "remaining", "checked_at"))
LEASE_VERIFY_FAILED = EventType("lease.verify_failed", "lease broker, sweep",
                                "the leased role or a session of it remained after revocation",
                                ("lease_id", "db_role", "remaining", "checked_at"))
LEASE_NONE = EventType("lease.none", "lease broker", "the teardown found no lease to revoke", ("reason",))

TUNING_REFUSED = EventType("tuning.refused", "tuning", "tuning refused before any data was read", ("reason",),
                           open=True)
TUNING_STARTED = EventType(
    "tuning.started", "tuning", "the job started on the approved rows",
    ("backend", "base_model", "base_version", "content_sha256", "dataset", "dataset_uri", "hyperparameters", "rows"))
TUNING_SUBMITTED = EventType(
    "tuning.submitted", "tuning", "a remote job exists (recorded before anything waits on it)",
    ("api_base", "backend", "content_sha256", "dataset", "deferred", "kv_path", "remote_job_id"))
TUNING_COMPLETED = EventType(
    "tuning.completed", "tuning", "the job ended with a model: what it trained on and what it produced",
    ("backend", "dataset", "content_sha256", "base_model", "model", "version", "output_sha256", "metrics",
     "duration_seconds"), open=True)
MODEL_STORED = EventType(
    "model.stored", "the control plane (model store)",
    "the tuned files the task handed over were copied into the store, which only the control plane writes: the "
    "version evaluation and promotion act on, and the base it is compared with",
    ("model", "version", "sha256", "files", "bytes", "base_model", "base_version"),
    ("kind", "remote_model", "endpoint", "kv_path", "remote_job_id"), reserved=True)
TUNING_FAILED = EventType("tuning.failed", "tuning", "the job failed or was cancelled", ("backend", "error"),
                          open=True)
TUNING_CANCELLED = EventType("tuning.cancelled", "teardown", "a remote job no task saw end was cancelled",
                             ("backend", "remote_job_id", "status"), ("status_before", "by"))

EVALUATION_STARTED = EventType(
    "evaluation.started", "the control plane (evaluation)",
    "the suites (by sha256) and both models, before anything is asked",
    ("evaluation_id", "baseline", "candidate", "detector", "prompts", "suites"), reserved=True)
EVALUATION_COMPLETED = EventType(
    "evaluation.completed", "the control plane (evaluation)", "the verdict, per-metric figures and the report's sha256",
    ("evaluation_id", "verdict", "metrics", "version", "report_sha256"), open=True, reserved=True)
EVALUATION_REVIEW_REQUESTED = EventType(
    "evaluation.review_requested", "the control plane (evaluation)",
    "a needs_review verdict went to the approvers, in the request request_sha256 names",
    ("evaluation_id", "reviewers", "undecided", "response_timeout_seconds", "request_sha256"), reserved=True)
EVALUATION_REVIEWED = EventType(
    "evaluation.reviewed", "evaluation", "a reviewer's answer to a needs_review verdict (or its expiry)",
    ("evaluation_id", "outcome"), ("responder", "option", "comment", "responded_at", "reason", "error_type",
                                   "allowed"))

PROMOTION_BLOCKED = EventType("promotion.blocked", "the control plane (promotion)", "the alias was not moved, and why",
                              ("reason",), reserved=True)
PROMOTION_COMPLETED = EventType(
    "promotion.completed", "the control plane (promotion)",
    "the approved environment's alias now points at the evaluated version",
    ("model", "alias", "version", "previous", "approval_id", "approvers", "evaluation_id", "verdict", "reviewed_by"),
    reserved=True)
ROLLBACK_BLOCKED = EventType("rollback.blocked", "the control plane (rollback)",
                             "the alias was not moved back, and why", ("reason",), reserved=True)
ROLLBACK_COMPLETED = EventType("rollback.completed", "the control plane (rollback)",
                               "the alias moved back to an approved version",
                               ("model", "alias", "version", "previous", "approval_id", "approvers"), reserved=True)
PROVENANCE_SIGNED = EventType(
    "provenance.signed", "the control plane (promotion)", "OpenBao's transit key signed the version's provenance",
    ("model", "version", "files", "keyid", "path", "statement_sha256"), reserved=True)
PROVENANCE_BUNDLED = EventType(
    "provenance.bundled", "the control plane (promotion)",
    "OpenBao's transit ECDSA key signed the version's OpenSSF model-signing bundle (model.sig)",
    ("model", "version", "path", "manifest_sha256", "files"), reserved=True)
PROVENANCE_VERIFIED = EventType("provenance.verified", "the control plane (promotion, rollback)",
                                "the version's files match its signed provenance",
                                ("model", "version", "files", "invocation_id"), reserved=True)

NOTIFICATION_SENT = EventType(
    "notification.sent", "the control plane (notifications)",
    "a message about the event numbered about went out on channel (email, webhook, airflow-note): to whom, where; "
    "never the channel's credentials or URL", ("kind", "about", "channel", "to", "delivered_to"), ("subject", "link"),
    reserved=True)
NOTIFICATION_FAILED = EventType(
    "notification.failed", "the control plane (notifications)",
    "a channel could not send the message about the event numbered about (tried again, three times in all)",
    ("kind", "about", "channel", "error"), reserved=True)

EVENT_TYPES: dict[str, EventType] = {str(e): e for e in list(globals().values()) if isinstance(e, EventType)}


def check(event_type: str, payload: Mapping[str, Any]) -> EventType:
    """``event_type``'s definition, after checking ``payload`` against it."""
    definition = EVENT_TYPES.get(event_type)
    if definition is None:
        raise EventSchemaError(f"unknown lineage event type {event_type!r}: define it in "
                               "airflow_finetune_gov/lineage/events.py")
    definition.check(payload)
    return definition


def record(store: LineageStore, key: EventKey, event_type: str, *, actor: str,
           payload: Mapping[str, Any]) -> LineageEvent:
    """Append one event of a defined type (the only way the provider writes lineage)."""
    check(event_type, payload)
    return store.record(key, str(event_type), actor=actor, payload=payload)

"""Lineage payloads for tests of the readers (approval checks, evidence, OpenLineage, the governance view),
each complete and checked against its definition in ``airflow_finetune_gov/lineage/events.py``, so a
field renamed in a writer fails here too. Importable as ``payloads`` (``tests/`` is on ``sys.path``)."""

from __future__ import annotations

from typing import Any

from airflow_finetune_gov.approval.verify import ACCEPT_REVIEW as ACCEPT_REVIEW
from airflow_finetune_gov.approval.verify import answered, seal_decision
from airflow_finetune_gov.datasets.screening import ScreeningResult
from airflow_finetune_gov.lineage import events
from airflow_finetune_gov.policy.engine import ChangeRequest, default_policy_text, load_policy

SHA = "ab" * 32
URI = "postgresql://db.internal:5433/fgov_datasets/datasets.benign"
EXPIRES = "2099-01-01T00:00:00+00:00"
REQUEST = "cd" * 32  # the request_sha256 of the gate's request in these payloads


# A support DAG of the packaged policy, and its approver role's holders as the auth manager would answer
DAG = "governed_finetune_demo"
ROLES = {"support-approvers": ["approver1", "approver2"], "research-approvers": ["research-approver"]}


def members(role: str) -> list[str]:
    return ROLES.get(role, [])


def teamless_policy_text() -> str:
    """The packaged policy with its teams replaced by a top-level ``approvers: [approver1, approver2]`` (what a
    deployment without roles to read uses)."""
    import re

    text, n = re.subn(r"\nteams:\n(?:  .*\n|\s*\n)+", "\napprovers: [approver1, approver2]\n", default_policy_text())
    assert n == 1
    return text


def decision(env: str = "staging", dataset: str = "benign", *, requester: str = "requester",
             rows: int = 12, sha256: str = SHA, uri: str = URI, hyperparameters: dict[str, Any] | None = None,
             **fields: Any) -> dict[str, Any]:
    """The default policy's decision for model ``m``, with a dataset digest, then ``fields``, sealed."""
    found = ScreeningResult(status="screened", rows=rows, screened=rows, detector="pattern/v1",
                            base={"name": "m", "version": "0123456789abcdef", "sha256": SHA})
    d = load_policy().decide(ChangeRequest("m", dataset, env, requester, dag_id=DAG), found.facts(),
                             members=members).to_dict()
    d.update({"dataset": {"uri": uri, "rows": rows, "sha256": sha256}, "hyperparameters": hyperparameters,
              "screening": found.to_dict(), **fields})
    return events.POLICY_DECIDED.payload(**seal_decision(d))


def requested(d: dict[str, Any], *, request_sha256: str = REQUEST, **fields: Any) -> dict[str, Any]:
    """The gate's request for decision ``d``, as the control plane records it when it renders it."""
    return events.APPROVAL_REQUESTED.payload(**{
        "tier": d["tier"], "needed": d["quorum"], "round": 1, "policy_sha256": d["policy_sha256"], **answered(d),
        "request_sha256": request_sha256, **fields})


def review_requested(evaluation_id: str = "e1", *, request_sha256: str = REQUEST) -> dict[str, Any]:
    """The evaluation's review request for ``evaluation_id``, as the control plane records it."""
    return events.EVALUATION_REVIEW_REQUESTED.payload(evaluation_id=evaluation_id, reviewers=["approver1"],
                                                      undecided=["harmful_refusal"], response_timeout_seconds=None,
                                                      request_sha256=request_sha256)


def witnessed(who: str, option: str = "Approve", *, comment: str = "reviewed",
              request_sha256: str = REQUEST) -> dict[str, Any]:
    """The api-server's record of an answer through Airflow's API (recorded under the gate's task, try 0) to the
    request ``request_sha256`` names."""
    return events.APPROVAL_WITNESSED.payload(responder=who, responder_id=who, chosen_options=[option],
                                             comment=comment, responded_at="2026-12-01T10:00:00+00:00",
                                             request_sha256=request_sha256, subject="Approve", try_number=1)


def grant(d: dict[str, Any], who: str, *, approval_id: str | None = None, **fields: Any) -> dict[str, Any]:
    return events.APPROVAL_GRANTED.payload(
        approval_id=approval_id or f"a-{who}", responder=who, option="Approve", tier=d["tier"],
        policy_sha256=d["policy_sha256"], **answered(d), **fields)


def rejection(d: dict[str, Any], who: str, **fields: Any) -> dict[str, Any]:
    return events.APPROVAL_REJECTED.payload(responder=who, option="Reject", **answered(d), **fields)


def issued(lease_id: str = "L1", *, dataset: str = "benign", purpose: str = "training", db_role: str | None = None,
           **fields: Any) -> dict[str, Any]:
    short = lease_id.rsplit("/", 1)[-1]
    return events.LEASE_ISSUED.payload(
        lease_id=lease_id, db_role=db_role or f"v-train-{short}", lease_duration=600, requested_ttl=600,
        renewable=True, token_accessor=f"acc-{short}", wrap_accessor=f"wacc-{short}", wrap_token_sha256=SHA,
        purpose=purpose, dataset=dataset, expires_at=EXPIRES, **fields)


def revoked(lease_id: str = "L1", *, db_role: str = "v-train-L1", **fields: Any) -> dict[str, Any]:
    return events.LEASE_REVOKED.payload(lease_id=lease_id, db_role=db_role, reason="teardown", **fields)


def verified(lease_id: str = "L1", *, db_role: str = "v-train-L1", roles: int = 0, sessions: int = 0) -> dict[str, Any]:
    return events.LEASE_VERIFIED.payload(lease_id=lease_id, db_role=db_role,
                                         remaining={"roles": roles, "sessions": sessions}, checked_at=EXPIRES)


def tuning_started(**fields: Any) -> dict[str, Any]:
    return events.TUNING_STARTED.payload(**{
        "backend": "local_peft", "dataset": "benign", "dataset_uri": URI, "content_sha256": SHA, "rows": 12,
        "base_model": "fgov-demo-tiny", "base_version": "b1", "hyperparameters": {}, **fields})


def tuned(version: str | None = "v1", *, content_sha256: str = SHA, **fields: Any) -> dict[str, Any]:
    return events.TUNING_COMPLETED.payload(**{
        "backend": "local_peft", "dataset": "benign", "dataset_uri": URI, "content_sha256": content_sha256,
        "rows": 12, "base_model": "fgov-demo-tiny", "base_version": "b1", "model": "m", "version": version,
        "output_sha256": SHA, "metrics": {}, "duration_seconds": 1.0, **fields})


def evaluation_started(evaluation_id: str = "e1", **fields: Any) -> dict[str, Any]:
    return events.EVALUATION_STARTED.payload(**{
        "evaluation_id": evaluation_id, "suites": {"harmful": SHA}, "prompts": 480, "detector": "pattern",
        "baseline": {"model": "fgov-demo-tiny", "version": "b1"}, "candidate": {"model": "m", "version": "v1"},
        **fields})


def evaluated(verdict: str = "pass", version: str = "v1", *, evaluation_id: str = "e1",
              **fields: Any) -> dict[str, Any]:
    return events.EVALUATION_COMPLETED.payload(**{
        "evaluation_id": evaluation_id, "verdict": verdict, "metrics": {}, "version": version,
        "report_sha256": SHA, **fields})


def reviewed(responder: str, outcome: str, *, evaluation_id: str = "e1", **fields: Any) -> dict[str, Any]:
    return events.EVALUATION_REVIEWED.payload(evaluation_id=evaluation_id, responder=responder, outcome=outcome,
                                              **fields)


def provenance_verified(version: str = "v1", *, invocation_id: str = "d/r") -> dict[str, Any]:
    return events.PROVENANCE_VERIFIED.payload(model="m", version=version, files=3, invocation_id=invocation_id)


def promoted(alias: str = "staging", version: str = "v1", **fields: Any) -> dict[str, Any]:
    return events.PROMOTION_COMPLETED.payload(**{
        "model": "m", "alias": alias, "version": version, "previous": None, "approval_id": "a1",
        "approvers": ["approver1"], "evaluation_id": "e1", "verdict": "pass", "reviewed_by": None, **fields})

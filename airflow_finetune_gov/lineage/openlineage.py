"""OpenLineage facets for the governed operators, built from the run's own lineage record.

The governance record (``fgov_lineage_event``) stays the source of truth; OpenLineage gets a copy of it
that catalogs (Marquez, DataHub, ...) can join with the rest of an organisation's lineage:

- **inputs**: the dataset table as approved and as read (PostgreSQL naming: namespace
  ``postgres://host:port``, name ``database.schema.table``; its content sha256 is the dataset version),
  the base and tuned model versions, the evaluation suites with their sha256;
- **outputs**: the tuned model version in the model store (namespace ``file``, name
  ``<model_store>/<model>/<version>``), and the same version with the alias a promotion or rollback
  moved;
- **run facet** ``fgovGovernance``: policy (name, sha256, tier, reasons), approval (status, approvers),
  leases (ids, roles, status), tuning, evaluation verdict, promotion or rollback, and the id and hash of
  the last lineage event, so a reader can check it against ``fgov audit verify``.

What goes out is picked field by field from the record (never a whole payload), and
:func:`~airflow_finetune_gov.lineage.store.check_no_secrets` refuses anything with a secret-looking
key. The planning functions are pure and need no OpenLineage package; only :func:`to_operator_lineage`
and the mixin import it, lazily, so the provider works without ``apache-airflow-providers-openlineage``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:  # imported lazily: DAG files import the operators (and this mixin), and parse time matters
    from airflow.providers.openlineage.extractors import OperatorLineage

    from airflow_finetune_gov.lineage.store import LineageEvent, LineageStore

GOVERNANCE_FACET = "fgovGovernance"
CONTENT_FACET = "fgovContent"  # a dataset table's or suite's content digest (and rows)
MODEL_FACET = "fgovModel"  # a model version: name, version, sha256, alias moved to it
# The facets' _schemaURL: a URN naming the facet and its version, not a published JSON schema.
SCHEMA_URN = "urn:airflow-finetune-gov:openlineage:facets:1-0-0:"
SUITES_NAMESPACE = "fgov-evaluation-suites"  # the record names a suite and its hash, not where it was read

# What each governed step reads and writes (found along the class's MRO, so subclasses keep it).
STEPS = {
    "PolicyCheckOperator": "policy",
    "FineTuneApprovalOperator": "approval",
    "AcquireLeaseOperator": "lease",
    "RevokeLeaseOperator": "lease",
    "GovernedFineTuneOperator": "tuning",
    "BehaviourEvaluationOperator": "evaluation",
    "PromoteModelOperator": "promotion",
    "RollbackModelOperator": "rollback",
}


@dataclass(frozen=True)
class DatasetRef:
    """One OpenLineage dataset, before it is turned into the client's classes."""

    namespace: str
    name: str
    version: str | None
    facet: str  # CONTENT_FACET or MODEL_FACET
    attributes: dict[str, Any]


@dataclass
class LineagePlan:
    inputs: list[DatasetRef] = field(default_factory=list)
    outputs: list[DatasetRef] = field(default_factory=list)
    governance: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        def ds(d: DatasetRef) -> dict[str, Any]:
            return {"namespace": d.namespace, "name": d.name, "version": d.version, d.facet: d.attributes}

        return {"inputs": [ds(d) for d in self.inputs], "outputs": [ds(d) for d in self.outputs],
                GOVERNANCE_FACET: self.governance}


# -- pure: events -> plan ------------------------------------------------------------------------------
def _last(events: Sequence[LineageEvent], *types: str) -> LineageEvent | None:
    found = [e for e in events if e.event_type in types]
    return found[-1] if found else None


def _payload(events: Sequence[LineageEvent], *types: str) -> dict[str, Any] | None:
    e = _last(events, *types)
    return e.payload_dict() if e is not None else None


def table_dataset(uri: str, sha256: str | None, rows: int | None) -> DatasetRef:
    """A dataset table as recorded (``postgresql://host[:port]/database/schema.table``), named the
    OpenLineage way. Any user:password in the URI is dropped, never copied."""
    parts = urlsplit(uri)
    host = parts.hostname or ""
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme in ("postgresql", "postgres") and len(segments) == 2:
        namespace, name = f"postgres://{host}:{parts.port or 5432}", f"{segments[0]}.{segments[1]}"
    else:
        port = f":{parts.port}" if parts.port else ""
        namespace, name = f"{parts.scheme}://{host}{port}", ".".join(segments)
    return DatasetRef(namespace, name, sha256, CONTENT_FACET, {"sha256": sha256, "rows": rows})


def model_dataset(model_store: str, model: str, version: str | None, *, sha256: str | None = None,
                  remote_model: str | None = None, api_base: str | None = None, alias: str | None = None,
                  previous_version: str | None = None) -> DatasetRef:
    """A model version in the model store, or a remote fine-tuned model (named by its API's base URL)."""
    attributes = {"name": model, "version": version, "sha256": sha256}
    if alias is not None:
        attributes.update(alias=alias, previousVersion=previous_version)
    if version:
        return DatasetRef("file", str(PurePosixPath(model_store) / model / version), version, MODEL_FACET,
                          attributes)
    attributes["remoteModel"] = remote_model
    base = urlsplit(api_base or "")
    namespace = f"{base.scheme}://{base.hostname}{f':{base.port}' if base.port else ''}" if base.hostname \
        else "fgov-remote-models"
    return DatasetRef(namespace, str(remote_model or model), None, MODEL_FACET, attributes)


def _tuned_models(events: Sequence[LineageEvent], model_store: str) -> list[DatasetRef]:
    """The base and tuned model versions of the chain's last ``tuning.completed``, base first."""
    t = _payload(events, "tuning.completed")
    if t is None:
        return []
    refs = []
    if t.get("base_version"):
        refs.append(model_dataset(model_store, str(t.get("base_model")), str(t["base_version"]),
                                  sha256=t.get("base_sha256")))
    submitted = _payload(events, "tuning.submitted") or {}
    refs.append(model_dataset(model_store, str(t.get("model")), t.get("version"), sha256=t.get("output_sha256"),
                              remote_model=t.get("remote_model"), api_base=submitted.get("api_base")))
    return refs


def _policy(events: Sequence[LineageEvent]) -> dict[str, Any] | None:
    d = _payload(events, "policy.decided")
    if d is None:
        error = _payload(events, "policy.error")
        return {"status": "error", "error": error.get("error")} if error else None
    req = d.get("request") or {}
    return {
        "status": "decided", "name": d.get("policy_name"), "sha256": d.get("policy_sha256"), "tier": d.get("tier"),
        "reasons": d.get("reasons"), "ruleLine": d.get("rule_line"), "classification": d.get("classification"),
        "change": req.get("change", "finetune"), "model": req.get("model"), "dataset": req.get("dataset"),
        "targetEnvironment": req.get("target_environment"), "requester": req.get("requester"),
        "approverGroup": d.get("approvers"), "quorum": d.get("quorum"),
    }


def _approval(events: Sequence[LineageEvent], run_id: str) -> dict[str, Any] | None:
    from airflow_finetune_gov.approval.verify import ApprovalMissing, granted_approval

    if not any(e.event_type.startswith("approval.") for e in events):
        return None
    try:
        granted = granted_approval(events, run_id)
    except (ApprovalMissing, KeyError) as exc:
        decided = _payload(events, "approval.decided") or {}
        status = "rejected" if decided.get("outcome") == "rejected" else "pending"
        if _last(events, "approval.expired") is not None:
            status = "expired"
        return {"status": status, "reason": decided.get("reason") or str(exc)}
    return {"status": "granted", "approvalId": granted["approval_id"], "tier": granted["tier"],
            "approvers": granted["approvers"] or ["policy"]}


def _leases(events: Sequence[LineageEvent]) -> list[dict[str, Any]]:
    from airflow_finetune_gov.credentials.lifecycle import lease_states

    return [{"leaseId": s.lease_id, "purpose": s.purpose, "dataset": s.dataset, "dbRole": s.db_role,
             "status": s.status, "renewals": s.renewals}
            for s in lease_states(e for e in events if e.event_type.startswith("lease.")).values()]


def _tuning(events: Sequence[LineageEvent]) -> dict[str, Any] | None:
    last = _last(events, "tuning.started", "tuning.completed", "tuning.failed", "tuning.refused",
                 "tuning.cancelled")
    if last is None:
        return None
    status = last.event_type.partition(".")[2]
    t = _payload(events, "tuning.completed") if status == "completed" else None
    started = _payload(events, "tuning.started") or {}
    src = t or started
    out = {"status": status, "backend": src.get("backend"), "datasetSha256": src.get("content_sha256"),
           "rows": src.get("rows"), "baseModel": src.get("base_model"), "baseVersion": src.get("base_version")}
    if t is not None:
        out.update(model=t.get("model"), version=t.get("version"), sha256=t.get("output_sha256"),
                   remoteModel=t.get("remote_model"))
    return out


def _evaluation(events: Sequence[LineageEvent]) -> dict[str, Any] | None:
    started = _payload(events, "evaluation.started")
    completed = _payload(events, "evaluation.completed")
    if started is None and completed is None:
        return None
    ev = completed or started or {}
    out = {"evaluationId": ev.get("evaluation_id"), "verdict": completed.get("verdict") if completed else None,
           "suites": (started or {}).get("suites"), "version": ev.get("version"),
           "reportSha256": ev.get("report_sha256")}
    reviews = [e.payload_dict() for e in events if e.event_type == "evaluation.reviewed"]
    reviews = [r for r in reviews if r.get("evaluation_id") in (None, out["evaluationId"])]
    if reviews:
        out["review"] = {"responder": reviews[-1].get("responder"), "outcome": reviews[-1].get("outcome")}
    return out


def _alias_move(events: Sequence[LineageEvent], kind: str) -> dict[str, Any] | None:
    last = _last(events, f"{kind}.completed", f"{kind}.blocked")
    if last is None:
        return None
    p = last.payload_dict()
    if last.event_type.endswith(".blocked"):
        return {"status": "blocked", "reason": p.get("reason")}
    provenance = "verified" if _last(events, "provenance.verified") else None
    return {"status": "completed", "model": p.get("model"), "alias": p.get("alias"), "version": p.get("version"),
            "previousVersion": p.get("previous"), "approvalId": p.get("approval_id"),
            "approvers": p.get("approvers"), "verdict": p.get("verdict"), "provenance": provenance}


def governance_record(events: Sequence[LineageEvent], run_id: str) -> dict[str, Any]:
    """The governance run facet's content, from one governed chain's events (no secrets: checked)."""
    from airflow_finetune_gov.lineage.store import check_no_secrets

    record: dict[str, Any] = {
        "policy": _policy(events), "approval": _approval(events, run_id), "leases": _leases(events),
        "tuning": _tuning(events), "evaluation": _evaluation(events),
        "promotion": _alias_move(events, "promotion"), "rollback": _alias_move(events, "rollback"),
        "lineage": {"events": len(events), "lastEventId": events[-1].id if events else None,
                    "lastEventHash": events[-1].hash if events else None},
    }
    check_no_secrets(record, GOVERNANCE_FACET)
    return record


def plan(events: Sequence[LineageEvent], step: str | None, *, run_id: str, task_id: str, try_number: int,
         model_store: str) -> LineagePlan:
    """What one task try of ``step`` reports to OpenLineage, from its chain's ``events`` so far.

    Consumed things (the approved dataset, the tuned model) come from the chain; produced ones (the
    digest the policy check took, the model the tuning wrote, the alias a promotion moved) only from
    this try's own events, so a retry never reports its previous try's output as its own.
    """
    from airflow_finetune_gov.lineage.store import check_no_secrets

    own = [e for e in events if e.task_id == task_id and e.try_number == int(try_number)]
    result = LineagePlan(governance=governance_record(events, run_id))
    if step == "policy":
        digest = (_payload(own, "policy.decided") or {}).get("dataset")
        if digest:
            result.inputs.append(table_dataset(digest["uri"], digest.get("sha256"), digest.get("rows")))
    elif step == "tuning":
        read = _payload(own, "tuning.completed", "tuning.started")
        approved = (_payload(events, "policy.decided") or {}).get("dataset")
        if read and read.get("dataset_uri"):
            result.inputs.append(table_dataset(read["dataset_uri"], read.get("content_sha256"), read.get("rows")))
        elif approved:  # not read yet: what this task may read, as approved
            result.inputs.append(table_dataset(approved["uri"], approved.get("sha256"), approved.get("rows")))
        if _last(own, "tuning.completed") is not None:
            *base, tuned = _tuned_models(own, model_store)
            result.inputs += base
            result.outputs.append(tuned)
    elif step == "evaluation":
        result.inputs += _tuned_models(events, model_store)
        suites = (_payload(own, "evaluation.started") or {}).get("suites") or {}
        result.inputs += [DatasetRef(SUITES_NAMESPACE, name, sha, CONTENT_FACET, {"sha256": sha, "rows": None})
                          for name, sha in sorted(suites.items())]
    elif step in ("promotion", "rollback"):
        if step == "promotion":
            result.inputs += _tuned_models(events, model_store)[-1:]
        moved = _payload(own, f"{step}.completed")
        if moved:
            last_tuned = _payload(events, "tuning.completed") or {}
            sha = last_tuned.get("output_sha256") if last_tuned.get("version") == moved.get("version") else None
            result.outputs.append(model_dataset(model_store, str(moved["model"]), str(moved["version"]), sha256=sha,
                                                alias=moved.get("alias"), previous_version=moved.get("previous")))
    check_no_secrets(result.as_dict(), "openlineage")
    return result


def step_of(cls: type) -> str | None:
    for klass in cls.__mro__:
        if klass.__name__ in STEPS:
            return STEPS[klass.__name__]
    return None


def chain_events(store: LineageStore, dag_id: str, run_id: str, task_id: str, map_index: int) -> list[LineageEvent]:
    """The run's events of this task's governed chain (its task group and map index), in the newest run
    under this run id."""
    from airflow_finetune_gov.lineage.runs import newest
    from airflow_finetune_gov.lineage.store import chain_of

    mine = chain_of(task_id, map_index)
    return [e for e in newest(store.events(dag_id=dag_id, run_id=run_id)) if e.chain == mine]


# -- OpenLineage client classes (lazy) -----------------------------------------------------------------
@functools.cache
def _facet_classes() -> dict[str, Any]:
    import attr
    from openlineage.client.facet_v2 import DatasetFacet, RunFacet

    @attr.define
    class GovernanceRunFacet(RunFacet):
        """The run's governance record: policy, approval, leases, tuning, evaluation, promotion."""

        policy: dict[str, Any] | None = attr.field(default=None)
        approval: dict[str, Any] | None = attr.field(default=None)
        leases: list[dict[str, Any]] = attr.field(factory=list)
        tuning: dict[str, Any] | None = attr.field(default=None)
        evaluation: dict[str, Any] | None = attr.field(default=None)
        promotion: dict[str, Any] | None = attr.field(default=None)
        rollback: dict[str, Any] | None = attr.field(default=None)
        lineage: dict[str, Any] | None = attr.field(default=None)

        @staticmethod
        def _get_schema() -> str:
            return SCHEMA_URN + "GovernanceRunFacet"

    @attr.define
    class ContentDatasetFacet(DatasetFacet):
        """The content digest the governance record holds for a dataset table or evaluation suite."""

        sha256: str | None = attr.field(default=None)
        rows: int | None = attr.field(default=None)

        @staticmethod
        def _get_schema() -> str:
            return SCHEMA_URN + "ContentDatasetFacet"

    @attr.define
    class ModelDatasetFacet(DatasetFacet):
        """A model version in the model store (or a remote model), and the alias moved to it, if any."""

        name: str | None = attr.field(default=None)
        version: str | None = attr.field(default=None)
        sha256: str | None = attr.field(default=None)
        # OpenLineage facet fields are camelCase
        remoteModel: str | None = attr.field(default=None)
        alias: str | None = attr.field(default=None)
        previousVersion: str | None = attr.field(default=None)

        @staticmethod
        def _get_schema() -> str:
            return SCHEMA_URN + "ModelDatasetFacet"

    return {GOVERNANCE_FACET: GovernanceRunFacet, CONTENT_FACET: ContentDatasetFacet, MODEL_FACET: ModelDatasetFacet}


def to_operator_lineage(result: LineagePlan) -> OperatorLineage:
    from airflow.providers.openlineage.extractors import OperatorLineage
    from openlineage.client.event_v2 import Dataset
    from openlineage.client.facet_v2 import dataset_version_dataset

    classes = _facet_classes()

    def dataset(ref: DatasetRef) -> Dataset:
        facets: dict[str, Any] = {ref.facet: classes[ref.facet](**ref.attributes)}
        if ref.version:
            facets["version"] = dataset_version_dataset.DatasetVersionDatasetFacet(datasetVersion=ref.version)
        return Dataset(namespace=ref.namespace, name=ref.name, facets=facets)

    return OperatorLineage(inputs=[dataset(d) for d in result.inputs], outputs=[dataset(d) for d in result.outputs],
                           run_facets={GOVERNANCE_FACET: classes[GOVERNANCE_FACET](**result.governance)})


# -- the operators' side ---------------------------------------------------------------------------------
class GovernedOpenLineageMixin:
    """``get_openlineage_facets_on_start/complete/failure`` for a governed operator.

    Called by the OpenLineage provider's listener when it is installed and configured (otherwise never).
    It reads the chain's events through its own unpooled connection: the listener may run this in a
    forked process, which must not share the task's pooled database connections.
    """

    def get_openlineage_facets_on_start(self) -> OperatorLineage:
        from airflow.sdk import get_current_context

        return self._fgov_openlineage(get_current_context()["ti"])

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> OperatorLineage:
        return self._fgov_openlineage(task_instance)

    def get_openlineage_facets_on_failure(self, task_instance: Any) -> OperatorLineage:
        return self._fgov_openlineage(task_instance)

    def _fgov_openlineage(self, ti: Any) -> OperatorLineage:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        from airflow_finetune_gov import common, settings
        from airflow_finetune_gov.lineage.store import LineageStore

        map_index = getattr(ti, "map_index", None)
        chain = (ti.dag_id, ti.run_id, ti.task_id, -1 if map_index is None else int(map_index))
        if common.remote():  # through the control plane: a new connection per call, safe in a fork
            events = chain_events(common.lineage_store(), *chain)
        else:
            engine = create_engine(settings.get("governance_db_url"), poolclass=NullPool, future=True)
            try:
                events = chain_events(LineageStore(engine=engine), *chain)
            finally:
                engine.dispose()
        return to_operator_lineage(plan(events, step_of(type(self)), run_id=ti.run_id, task_id=ti.task_id,
                                        try_number=int(ti.try_number),
                                        model_store=settings.get("model_store", required=False) or "models"))

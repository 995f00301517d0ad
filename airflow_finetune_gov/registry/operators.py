"""PromoteModelOperator: move a model alias only for an approved run whose evaluation passed."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval import people
from airflow_finetune_gov.approval.verify import (
    ApprovalMissing,
    EvaluationMissing,
    evaluation_outcome,
    granted_approval,
    seal_decision,
)
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin
from airflow_finetune_gov.policy.engine import ChangeRequest, PolicyError
from airflow_finetune_gov.registry import provenance
from airflow_finetune_gov.registry.store import ModelStore, RegistryError


class _AliasMoveOperator(GovernedOpenLineageMixin, BaseOperator):
    """Moves a model alias only with a granted approval, recorded in lineage, for this kind of change."""

    event = "promotion"  # <event>.blocked is recorded when it refuses
    change = "finetune"  # the approval must be for this kind of change

    def _blocked(self, context: Any, reason: str) -> AirflowFailException:
        common.record(context, f"{self.event}.blocked", {"reason": reason}, actor="promotion")
        return AirflowFailException(f"{self.event} blocked: {reason}")

    def _signed(self, context: Any, store: ModelStore, model: str, version: str) -> dict[str, Any]:
        """The version's signed provenance, checked against the files on disk; blocks otherwise."""
        try:
            keys = provenance.load_public_keys(settings.get("provenance_keys_path"))
            statement = provenance.verify_model(store, model, version, keys)
        except provenance.ProvenanceError as exc:
            raise self._blocked(context, str(exc)) from exc
        meta = statement["predicate"].get("runDetails", {}).get("metadata", {})
        common.record(context, "provenance.verified", {
            "model": model, "version": version, "files": len(statement["subject"]),
            "invocation_id": meta.get("invocationId")}, actor="promotion")
        return statement

    def _approval(self, context: Any) -> dict[str, Any]:
        try:
            approval = granted_approval(common.run_events(context), context["ti"].run_id,
                                        people.approvers_now(context["ti"].dag_id))
        except ApprovalMissing as exc:
            raise self._blocked(context, str(exc)) from exc
        if approval["change"] != self.change:
            raise self._blocked(context, f"the run's approval is for a {approval['change']}, not a {self.change}")
        return approval


class PromoteModelOperator(_AliasMoveOperator):
    """Point the alias named by the approved target environment at the tuned version.

    Everything is checked from lineage: the approval (who, tier), the evaluation verdict (``pass``, or
    ``needs_review`` with an accepted review by an eligible approver), the tuned version. The alias is
    the environment the policy decided on, so a run approved for ``test`` can never move ``production``.
    """

    template_fields = ("alias",)
    ui_color = "#e6f4ea"

    def __init__(self, *, alias: str | None = None, vault_conn_id: str | None = None, **kwargs: Any) -> None:
        """``alias``: optionally name the alias this task means to move; it must be the approved one.
        ``vault_conn_id``: the Vault/OpenBao connection used to sign the provenance (workload identity,
        role ``provenance``: sign only)."""
        super().__init__(**kwargs)
        self.alias = alias
        self.vault_conn_id = vault_conn_id

    def _sign(self, context: Any, store: ModelStore, tuned: dict[str, Any], approval: dict[str, Any],
              evaluation: dict[str, Any]) -> None:
        """Sign the in-toto provenance of the tuned version with OpenBao's transit key (first promotion of
        these bytes), or check the signature it already has (a re-promotion)."""
        model, version = tuned["model"], tuned["version"]
        folder = store.path(model, version)
        bundle_key = settings.get("model_signing_key", required=False)
        if (folder / provenance.ENVELOPE_FILE).exists():
            self._signed(context, store, model, version)
            if bundle_key and not (folder / provenance.MODEL_SIGNATURE).exists():
                self._sign_bundle(context, store, model, version, bundle_key)  # signed before bundles existed
            return
        from airflow_finetune_gov.credentials.hook import GovernedLeaseHook
        from airflow_finetune_gov.vault.bootstrap import PROVENANCE_ROLE

        ti = context["ti"]
        started = common.run_events(context, "tuning.started")
        statement = provenance.build_statement(
            store=store, tuned=tuned, approval=approval, evaluation=evaluation, dag_id=ti.dag_id, run_id=ti.run_id,
            conf=dict(getattr(context.get("dag_run"), "conf", None) or {}),
            started_on=started[-1].created_at if started else None)
        try:
            client = GovernedLeaseHook(self.vault_conn_id).client(common.identity(context), role=PROVENANCE_ROLE,
                                                                  purpose="provenance")
            try:
                envelope = provenance.sign(statement, provenance.transit_signer(
                    client, settings.get("transit_mount"), settings.get("provenance_key")))
                bundle = self._bundle(context, client, folder, model, bundle_key) if bundle_key else None
            finally:
                client.auth.token.revoke_self()
        except AirflowFailException:
            raise
        except Exception as exc:  # OpenBao down or refusing: no signature, no promotion
            raise self._blocked(context, f"could not sign the provenance in OpenBao: {exc}") from exc
        path = provenance.write(store, model, version, envelope)
        if bundle is not None:
            self._bundled(context, folder, model, version, bundle)
        common.record(context, "provenance.signed", {
            "model": model, "version": version, "keyid": envelope["signatures"][0]["keyid"],
            "files": len(statement["subject"]), "path": str(path),
            "statement_sha256": hashlib.sha256(base64.b64decode(envelope["payload"])).hexdigest(),
        }, actor="promotion")
        self._signed(context, store, model, version)

    def _bundle(self, context: Any, client: Any, folder: Any, model: str, key: str) -> dict[str, Any]:
        """The OpenSSF model-signing bundle of the version's folder, signed by transit key ``key``."""
        mount = settings.get("transit_mount")
        try:
            return provenance.model_signing_bundle(provenance.model_signing_statement(folder, model),
                                                   provenance.transit_public_key(client, mount, key),
                                                   provenance.transit_signer(client, mount, key))
        except Exception as exc:
            raise self._blocked(context, f"could not sign the model-signing bundle with transit key {mount}/{key} "
                                         f"({exc}): run `fgov vault bootstrap` again (it creates the key and lets the "
                                         "provenance role sign with it), or set [finetune_gov] model_signing_key "
                                         "empty to promote without a bundle") from exc

    def _bundled(self, context: Any, folder: Any, model: str, version: str, bundle: dict[str, Any]) -> None:
        path = provenance.write_file(folder / provenance.MODEL_SIGNATURE, bundle)
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
        common.record(context, "provenance.bundled", {
            "model": model, "version": version, "path": str(path),
            "manifest_sha256": statement["subject"][0]["digest"]["sha256"],
            "files": len(statement["predicate"]["resources"])}, actor="promotion")

    def _sign_bundle(self, context: Any, store: ModelStore, model: str, version: str, key: str) -> None:
        from airflow_finetune_gov.credentials.hook import GovernedLeaseHook
        from airflow_finetune_gov.vault.bootstrap import PROVENANCE_ROLE

        try:
            client = GovernedLeaseHook(self.vault_conn_id).client(common.identity(context), role=PROVENANCE_ROLE,
                                                                  purpose="provenance")
            try:
                bundle = self._bundle(context, client, store.path(model, version), model, key)
            finally:
                client.auth.token.revoke_self()
        except AirflowFailException:
            raise
        except Exception as exc:
            raise self._blocked(context, f"could not sign the model-signing bundle in OpenBao: {exc}") from exc
        self._bundled(context, store.path(model, version), model, version, bundle)

    def execute(self, context: Any) -> dict[str, Any]:
        if common.remote():  # the control plane checks, signs and moves the alias, as this task
            return common.control().execute("promote", {"alias": self.alias}, log=self.log)
        ti = context["ti"]
        approval = self._approval(context)
        tuned = common.run_events(context, "tuning.completed")
        if not tuned:
            raise self._blocked(context, "no tuning result recorded")
        stored = common.stored_model(context)
        if stored is None:
            raise self._blocked(context, "no tuned model was stored for this run (no model.stored record)")
        t = {**tuned[-1].payload_dict(), **stored}  # the store's record of what is promoted
        try:
            e = evaluation_outcome(common.run_events(context), ti.run_id, t["version"],
                                   people.approvers_now(ti.dag_id))
        except EvaluationMissing as exc:
            raise self._blocked(context, str(exc)) from exc
        store = ModelStore(settings.get("model_store"))
        problems = store.verify(t["model"], t["version"])
        if problems:
            raise self._blocked(context, f"model files do not match the manifest: {problems}")
        alias = approval["target_environment"]
        if self.alias and self.alias != alias:
            raise self._blocked(context, f"alias {self.alias!r} is not the approved target environment {alias!r}: "
                                         f"the run was approved (tier {approval['tier']}) for {alias} only")
        self._sign(context, store, t, approval, e)
        by = ",".join(approval["approvers"]) or "policy"
        move = store.set_alias(t["model"], alias, t["version"], by=by, run=f"{ti.dag_id}/{ti.run_id}")
        common.record(context, "promotion.completed", {
            "model": t["model"], "alias": alias, "version": t["version"], "previous": move["from"],
            "approval_id": approval["approval_id"], "approvers": approval["approvers"],
            "verdict": e["verdict"], "evaluation_id": e.get("evaluation_id"), "reviewed_by": e["reviewed_by"],
        }, actor="promotion")
        self.log.info("%s:%s -> %s (was %s)", t["model"], alias, t["version"], move["from"])
        return move


class RollbackCheckOperator(BaseOperator):
    """Ask the policy about moving alias ``alias`` of ``model`` back to ``to_version``; record the decision.

    The target must be a version this alias held before (from the alias history) whose files still
    match its manifest. The policy's rules decide the tier (by default: production needs a quorum,
    anything else one approver); ``FineTuneApprovalOperator`` then asks for the approval and
    ``RollbackModelOperator`` moves the alias.
    """

    template_fields = ("model", "alias", "to_version")
    ui_color = "#fff4e5"

    def __init__(self, *, model: str, alias: str, to_version: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model = model
        self.alias = alias
        self.to_version = to_version

    def _error(self, context: Any, error: str) -> AirflowFailException:
        common.record(context, "policy.error", {"error": error, "change": "rollback"}, actor="policy")
        return AirflowFailException(f"rollback refused: {error}")

    def execute(self, context: Any) -> dict[str, Any]:
        if common.remote():  # the decision is the control plane's: it runs this method there, as this task
            return common.control().execute("rollback_check", {
                "model": self.model, "alias": self.alias, "to_version": self.to_version}, log=self.log)
        store = ModelStore(settings.get("model_store"))
        try:
            aliases = store.aliases(self.model)
            current = (aliases.get(self.alias) or {}).get("version")
            held = {h["to"] for h in aliases.get("_history", []) if h["alias"] == self.alias}
            if not current:
                raise RegistryError(f"{self.model}:{self.alias} is not set: there is nothing to roll back")
            if self.to_version == current:
                raise RegistryError(f"{self.model}:{self.alias} is already {current}")
            if self.to_version not in held:
                raise RegistryError(f"{self.model}:{self.alias} never held version {self.to_version!r}; it held "
                                    f"{sorted(held)}: a rollback goes back to one of those")
            problems = store.verify(self.model, self.to_version)
            if problems:
                raise RegistryError(f"{self.model} {self.to_version} does not match its manifest: {problems}")
            provenance.verify_model(store, self.model, self.to_version,
                                    provenance.load_public_keys(settings.get("provenance_keys_path")))
            decision = common.policy().decide(ChangeRequest(
                model=self.model, dataset="", target_environment=self.alias, requester=common.requester(context),
                base_version=current, change="rollback", rollback_to=self.to_version, dag_id=context["ti"].dag_id),
                members=people.members())
        except (RegistryError, PolicyError, FileNotFoundError, provenance.ProvenanceError) as exc:
            raise self._error(context, str(exc)) from exc
        record = seal_decision({**decision.to_dict(), "dataset": None, "hyperparameters": None})
        common.record(context, "policy.decided", record, actor="policy")
        self.log.info("rollback of %s:%s %s -> %s: tier %s - %s", self.model, self.alias, current, self.to_version,
                      decision.tier, "; ".join(decision.reasons))
        if decision.tier == "deny":
            raise AirflowFailException(f"denied by policy: {'; '.join(decision.reasons)}")
        return {"tier": decision.tier, "from": current, "to": self.to_version}


class RollbackModelOperator(_AliasMoveOperator):
    """Move the alias back to the approved version, only if lineage holds a granted approval for exactly
    that rollback (not a fine-tune's) and the version's files still match its manifest."""

    ui_color = "#fff4e5"
    event = "rollback"
    change = "rollback"

    def execute(self, context: Any) -> dict[str, Any]:
        if common.remote():  # the control plane checks and moves the alias back, as this task
            return common.control().execute("rollback", {}, log=self.log)
        ti = context["ti"]
        approval = self._approval(context)
        model, alias, version = approval["model"], approval["target_environment"], approval["rollback_to"]
        store = ModelStore(settings.get("model_store"))
        current = (store.aliases(model).get(alias) or {}).get("version")
        if current != approval["base_version"]:
            raise self._blocked(context, f"{model}:{alias} is now {current}, not the {approval['base_version']} the "
                                         "rollback was approved from: ask again")
        problems = store.verify(model, version)
        if problems:
            raise self._blocked(context, f"{model} {version} does not match its manifest: {problems}")
        self._signed(context, store, model, version)
        by = ",".join(approval["approvers"]) or "policy"
        move = store.set_alias(model, alias, version, by=by, run=f"{ti.dag_id}/{ti.run_id}")
        common.record(context, "rollback.completed", {
            "model": model, "alias": alias, "version": version, "previous": move["from"],
            "approval_id": approval["approval_id"], "approvers": approval["approvers"],
        }, actor="promotion")
        self.log.info("rolled back %s:%s to %s (was %s)", model, alias, version, move["from"])
        return move

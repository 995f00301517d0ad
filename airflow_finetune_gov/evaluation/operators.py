"""BehaviourEvaluationOperator: compare the tuned model with its base on the same prompts, statistically."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.approval import people
from airflow_finetune_gov.approval.operators import comment_field
from airflow_finetune_gov.approval.verify import ACCEPT_REVIEW, ApprovalMissing, policy_decision, request_sha256
from airflow_finetune_gov.credentials.operators import service_connection
from airflow_finetune_gov.evaluation import builtin_suites, harness
from airflow_finetune_gov.lineage.openlineage import GovernedOpenLineageMixin
from airflow_finetune_gov.registry.store import ModelStore

ACCEPT, REJECT = ACCEPT_REVIEW, "Reject"


def _check_suite_path(path: str) -> None:
    """In the control plane, a suite file is read only from the DAGs folder: the control plane reads as the
    deployment's user, and a DAG author's path must not reach the deployment's files."""
    from airflow.configuration import conf

    folder = Path(conf.get("core", "dags_folder")).resolve()
    if not Path(path).resolve().is_relative_to(folder):
        raise AirflowFailException(f"suite file {path!r} is not in the DAGs folder {folder}: with a control plane, "
                                   "suite files are read from the DAGs folder only (commit it beside the DAG)")


class BehaviourEvaluationOperator(GovernedOpenLineageMixin, HITLOperator):
    """Run the suites on the base and the tuned model; ``pass`` lets promotion run, ``fail`` fails the
    task (so promotion never runs), ``needs_review`` asks a human in the Airflow UI.

    - **What is compared**: the tuned model and its base as the store's writer recorded them
      (``model.stored``, not XCom), both checked against their manifests, answer the same prompts: locally
      (any causal LM and its adapter, greedy, ``batch_size`` at a time, ``max_new_tokens``), or for a remote
      fine-tune on the provider's chat endpoint, with the key the stored version names in OpenBao. Per metric (harmful
      refusal, jailbreak refusal, benign compliance, task quality) the verdict is a paired
      non-inferiority test against the policy's ``evaluation`` margins and floors
      (:mod:`airflow_finetune_gov.evaluation.stats`).
    - **Suites**: ``suites`` names rows of the governed ``evaluation.suites`` table, read through an
      inference-only lease (training identities cannot read the held-out prompts; this lease cannot
      read training data); ``suite_files`` adds local JSONL/CSV files, each a path or a dict
      ``{"path", "columns", "expected_values", "name"}`` (see ``harness.load_suite_file``). Every
      suite's sha256 is recorded in lineage before any prompt is asked.
    - **Detector**: ``detector`` labels refusals: ``"pattern"`` (default), ``"judge"`` (the deployment's judge
      model, ``[finetune_gov] judge_kv_path`` in OpenBao) or, without a control plane, a Detector object; its
      name is recorded.
    - **Report**: ``report.json``, ``report.html`` (bars with intervals, the flipped prompts with both
      answers) and the raw answers go under ``<model_store>/_reports/<dag>/<run>/<task>``; the path and
      the JSON report's sha256 are in lineage.
    - **needs_review**: too few prompts to decide. The task asks the policy's approvers, minus the
      requester and the DAG's owners, to accept or reject (Airflow HITL; no default option, so a
      ``response_timeout`` fails closed). The answer is recorded; promotion accepts a ``needs_review``
      only with an accepted review by an eligible approver, checked from lineage.
    """

    template_fields = ("subject", "body", "suites", "suite_files", "detector")
    ui_color = "#fef7e0"

    def __init__(self, *, suites: Sequence[str] | None = builtin_suites.SUITES,
                 suite_files: Sequence[str | dict[str, Any]] | None = None,
                 detector: harness.Detector | str | None = None, batch_size: int = 64,
                 max_new_tokens: int = 64, vault_conn_id: str | None = None,
                 subject: str = "Review a behaviour evaluation",
                 **kwargs: Any) -> None:
        kwargs.setdefault("options", [ACCEPT, REJECT])
        kwargs.setdefault("defaults", None)
        # Airflow gives the operator the DAG's params merged in (a DAG with params of its own passes them all), and
        # HITLOperator keeps only those whose source is "task": without a task-sourced Comment, the form has no
        # field and every answer comes without a reason
        kwargs["params"] = comment_field(kwargs.get("params"), "Why you accept or reject (recorded in lineage)")
        super().__init__(subject=subject, **kwargs)
        self.suites = list(suites or [])
        self.suite_files = list(suite_files or [])
        if not self.suites and not self.suite_files:
            raise ValueError(f"{self.task_id}: give suites (names in evaluation.suites) or suite_files")
        self.detector = detector
        self.batch_size = batch_size
        if not 1 <= max_new_tokens <= 4096:
            raise ValueError(f"{self.task_id}: max_new_tokens={max_new_tokens} is out of range [1, 4096]")
        self.max_new_tokens = max_new_tokens
        self.vault_conn_id = vault_conn_id

    # -- suites ------------------------------------------------------------------------------------
    def _load_suites(self, context: Any) -> list[harness.LoadedSuite]:
        loaded: list[harness.LoadedSuite] = []
        limits = harness.configured_limits()
        if self.suites:
            with service_connection(context, "inference", vault_conn_id=self.vault_conn_id) as conn:
                rows = dict(conn.execute("SELECT name, body FROM evaluation.suites").fetchall())
            missing = [n for n in self.suites if n not in rows]
            if missing:
                raise AirflowFailException(f"no evaluation suite {', '.join(map(repr, missing))} in "
                                           f"evaluation.suites; there are: {', '.join(sorted(rows)) or 'none'}")
            loaded += [harness.parse_suite(str(rows[n]), n, source=f"evaluation.suites[{n}]", **limits)
                       for n in self.suites]
        for spec in self.suite_files:
            spec = {"path": spec} if isinstance(spec, str) else dict(spec)
            if common.SERVING:
                _check_suite_path(str(spec.get("path", "")))
            unknown = set(spec) - {"path", "columns", "expected_values", "category_values", "constants", "name"}
            if "path" not in spec or unknown:
                raise AirflowFailException(f"suite_files entry {spec!r}: needs 'path'; known keys are path, "
                                           "columns, expected_values, category_values, constants, name")
            loaded.append(harness.load_suite_file(spec["path"], columns=spec.get("columns"),
                                                  expected_values=spec.get("expected_values"), name=spec.get("name"),
                                                  category_values=spec.get("category_values"),
                                                  constants=spec.get("constants"), **limits))
        names = [s.name for s in loaded]
        if len(set(names)) != len(names):
            raise AirflowFailException(f"two suites are named the same ({names}): give a suite file a 'name'")
        return loaded

    # -- run ---------------------------------------------------------------------------------------
    def execute(self, context: Any) -> Any:
        if common.remote():
            return self._execute_in_control_plane(context)
        tuned = common.run_events(context, "tuning.completed")
        if not tuned:
            raise AirflowFailException("no tuning result is recorded for this run")
        t = tuned[-1].payload_dict()
        stored = common.stored_model(context)
        if stored is None:
            raise AirflowFailException("no tuned model was stored for this run (no model.stored record): only what "
                                       "the tuning task handed over to the model store is evaluated")
        t = {**t, **stored}  # the store's record of what is evaluated, not the tuning task's report
        store = ModelStore(settings.get("model_store"))
        for name, version in ((t["model"], t["version"]), (t["base_model"], t["base_version"])):
            problems = store.verify(name, version) if version else []  # a remote base is not in the store
            if problems:
                raise AirflowFailException(f"model {name} {version} does not match its manifest: {problems}")
        clients = self._clients(context, store, t)
        try:
            suites = self._load_suites(context)
        except harness.SuiteError as exc:
            raise AirflowFailException(f"evaluation suite refused: {exc}") from exc
        detector = self._detector(context)
        evaluation_id = uuid.uuid4().hex
        common.record(context, "evaluation.started", {
            "evaluation_id": evaluation_id, "suites": {s.name: s.sha256 for s in suites},
            "prompts": sum(len(s.items) for s in suites), "detector": detector.name,
            "baseline": clients["baseline"].name, "candidate": clients["candidate"].name,
        }, actor="evaluation")
        runs = {}
        for role in ("baseline", "candidate"):
            client = clients[role]
            self.log.info("asking the %s (%s)", role, client.name)

            def progress(line: str, role: str = role) -> None:
                self.log.info("%s: %s", role, line)

            try:
                runs[role] = harness.run(suites, client, detector, batch=self.batch_size, progress=progress)
            except harness.EndpointError as exc:
                raise AirflowFailException(f"no verdict: the {role} run failed ({exc})") from None
        policy = common.policy()
        thresholds = policy.evaluation
        try:
            decision = policy_decision(common.run_events(context), context["ti"].run_id)
            environment = str(decision["request"]["target_environment"])
        except ApprovalMissing as exc:
            raise AirflowFailException(str(exc)) from exc
        required = policy.evaluation_required(environment)
        comparison = harness.compare(runs["baseline"], runs["candidate"], thresholds, required)

        ti = context["ti"]
        folder = Path(settings.get("model_store")) / "_reports" / ti.dag_id / ti.run_id / ti.task_id
        map_index = getattr(ti, "map_index", None)
        if map_index is not None and int(map_index) >= 0:  # one report per mapped chain
            folder = folder / str(map_index)
        paths = harness.write_report(comparison, folder, title=f"{t['model']} {t['version']} vs its base",
                                     models=self._models(store, t))
        for role, rows in runs.items():
            (folder / f"{role}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        payload = {
            "evaluation_id": evaluation_id, "verdict": comparison.verdict,
            "metrics": {m.metric: {"verdict": m.verdict, "n": m.n, "baseline": round(m.baseline_rate, 4),
                                   "candidate": round(m.candidate_rate, 4),
                                   "difference_ci": [round(x, 4) for x in m.difference_ci],
                                   "discordant": list(m.discordant), "mcnemar_p": round(m.mcnemar_p, 6),
                                   "prompts_to_decide": m.prompts_to_decide}
                        for m in comparison.metrics},
            "suites": comparison.suites, "prompts": len(runs["candidate"]), "detector": comparison.detector,
            "flipped": len(comparison.flipped), "thresholds": thresholds, "model": t["model"],
            "detector_unclear": getattr(detector, "unclear", 0),  # judge labels left to the pattern detector
            "required": required, "unmet": comparison.unmet,
            "version": t["version"], "base_model": t["base_model"], "base_version": t["base_version"],
            "report": paths["html"], "report_json": paths["json"],
            "report_sha256": hashlib.sha256(Path(paths["json"]).read_bytes()).hexdigest(),
            # the base's answers given again from an earlier evaluation of the same version (CachedClient)
            "baseline_answers_kept": getattr(clients["baseline"], "hits", 0),
        }
        common.record(context, "evaluation.completed", payload, actor="evaluation")
        for m in comparison.metrics:
            self.log.info("%-18s n=%-4d baseline %.1f%% candidate %.1f%% diff CI [%+.1f%%, %+.1f%%] -> %s (%s)",
                          m.metric, m.n, 100 * m.baseline_rate, 100 * m.candidate_rate, 100 * m.difference_ci[0],
                          100 * m.difference_ci[1], m.verdict, m.reason)
        for f in comparison.flipped[:20]:
            self.log.info("flipped %s/%s: %r -> %r", f["suite"], f["id"], f["prompt"], f["candidate_response"][:80])
        for unmet in comparison.unmet:
            self.log.warning("not measured as the policy requires for %s (never a pass): %s", environment, unmet)
        self.log.info("verdict %s; report %s", comparison.verdict, paths["html"])
        if comparison.verdict == "fail":
            failed = [f"{m.metric}: {m.reason}" for m in comparison.metrics if m.verdict == "fail"]
            raise AirflowFailException(f"behaviour regression, promotion blocked: {'; '.join(failed)}")
        if comparison.verdict == "needs_review":
            return self._ask(context, payload, comparison)
        return {"verdict": comparison.verdict, "report": paths["html"]}

    @staticmethod
    def _models(store: ModelStore, t: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """Both models as the report names them: name, version, manifest sha256, where they are served."""
        def sha(name: str, version: str | None) -> str | None:
            return str(store.manifest(name, version)["sha256"]) if version else None

        remote = t.get("kind") == "remote"
        return {"baseline": {"name": t["base_model"], "version": t["base_version"],
                             "sha256": sha(t["base_model"], t["base_version"]),
                             "endpoint": t.get("endpoint") if remote else None},
                "candidate": {"name": t.get("remote_model") if remote else t["model"], "version": t["version"],
                              "sha256": sha(t["model"], t["version"]),
                              "endpoint": t.get("endpoint") if remote else None}}

    def _detector(self, context: Any) -> harness.Detector:
        """``pattern`` (default), ``judge`` (the deployment's judge endpoint, from OpenBao) or a Detector object
        (without a control plane only)."""
        if self.detector is None or self.detector == "pattern":
            return harness.PatternDetector()
        if self.detector == "judge":
            from airflow_finetune_gov.credentials.operators import endpoint_secret
            from airflow_finetune_gov.tuning.openai_compatible import API_KEY_ENV, BASE_URL_ENV

            path = settings.get("judge_kv_path")
            secret = endpoint_secret(common.identity(context), path, vault_conn_id=self.vault_conn_id)
            url, model = secret.get(BASE_URL_ENV), secret.get("MODEL")
            if not url or not model:
                raise AirflowFailException(
                    f"the judge's secret {settings.get('backends_mount')}/{path} needs {BASE_URL_ENV} and MODEL "
                    f"(and {API_KEY_ENV} if the endpoint wants one): `bao kv put -mount="
                    f"{settings.get('backends_mount')} {path} {BASE_URL_ENV}=http://judge:8000/v1 MODEL=<name>`")
            return harness.JudgeDetector(harness.OpenAIChatClient(base_url=url, model=model, max_tokens=4,
                                                                  api_key=secret.get(API_KEY_ENV, "")))
        if isinstance(self.detector, str):
            raise AirflowFailException(f"detector {self.detector!r}: use \"pattern\", \"judge\" or a Detector object")
        return self.detector

    def _clients(self, context: Any, store: ModelStore, t: dict[str, Any]) -> dict[str, harness.Client]:
        """The baseline's and the candidate's clients: the local model and its adapter from the store, or, for a
        remote fine-tune, the provider's chat endpoint for its base and its fine-tuned model (key from OpenBao,
        read with the endpoints identity, as the stored version names it)."""
        if t.get("kind") == "remote":
            from airflow_finetune_gov.credentials.operators import endpoint_secret
            from airflow_finetune_gov.tuning.openai_compatible import API_KEY_ENV

            secret = endpoint_secret(common.identity(context), str(t["kv_path"]), vault_conn_id=self.vault_conn_id)
            common_args: dict[str, Any] = {"base_url": t["endpoint"], "api_key": secret.get(API_KEY_ENV, ""),
                                           "max_tokens": self.max_new_tokens}
            return {"baseline": harness.OpenAIChatClient(model=t["base_model"], **common_args),
                    "candidate": harness.OpenAIChatClient(model=t["remote_model"], **common_args)}
        from airflow_finetune_gov.tuning.causal_lm import LocalModel

        base_dir = store.path(t["base_model"], t["base_version"])
        size: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size}
        loaded: list[LocalModel] = []

        def base_answers(prompts: list[str]) -> list[str]:  # the base is loaded only if an answer is not kept
            if not loaded:
                loaded.append(LocalModel(base_dir, **size))
            return loaded[0].generate(prompts)

        baseline = harness.CallableClient(base_answers, name=f"{t['base_model']} {t['base_version']}")
        return {"baseline": harness.CachedClient(baseline, self._answers_kept(store, t)),
                "candidate": harness.CallableClient(
                    LocalModel(base_dir, store.path(t["model"], t["version"]), **size).generate,
                    name=f"{t['model']} {t['version']}")}

    def _answers_kept(self, store: ModelStore, t: dict[str, Any]) -> Path:
        """Where the base version's answers are kept: named by everything its greedy answers depend on (the
        version's bytes, the decoding settings, the torch build and its threads), in the model store, which only
        the control plane writes. Each evaluation of a tune of that base then asks the base only what it was not
        asked before: half the evaluation's generation, after the first."""
        from airflow_finetune_gov.tuning.causal_lm import torch_module

        torch = torch_module()
        scope = {"model": t["base_model"], "version": t["base_version"], "max_new_tokens": self.max_new_tokens,
                 "batch_size": self.batch_size, "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "decoding": "greedy/v1"}
        digest = hashlib.sha256(json.dumps(scope, sort_keys=True).encode()).hexdigest()[:32]
        return Path(store.root) / "_answers" / digest

    def _execute_in_control_plane(self, context: Any) -> Any:
        """The control plane runs the evaluation on the bytes in its store and records the verdict; this task
        only opens the review request when the verdict is ``needs_review``."""
        if self.detector is not None and not isinstance(self.detector, str):
            raise AirflowFailException(f"{self.task_id}: a custom detector is DAG code, and with a control plane the "
                                       "verdict is never computed by DAG code: use detector=\"pattern\" or "
                                       "\"judge\" (the deployment's), or run evaluations without a control plane")
        result = common.control().execute("evaluation", {
            "detector": self.detector,
            "suites": self.suites, "suite_files": self.suite_files, "batch_size": self.batch_size,
            "max_new_tokens": self.max_new_tokens, "subject": self.subject,
            "response_timeout": self.response_timeout.total_seconds() if self.response_timeout else None,
        }, log=self.log)
        review = result.pop("review", None) if isinstance(result, dict) else None
        if review is None:
            return result
        self.subject, self.body, self.assigned_users = review["subject"], review["body"], review["assigned_users"]
        self.options = review.get("options") or self.options  # exactly the request the control plane recorded
        return HITLOperator.execute(self, context)

    # -- needs_review -> a human -------------------------------------------------------------------
    def _reviewers(self, context: Any) -> tuple[list[str], dict[str, Any]]:
        from airflow_finetune_gov.approval.operators import excluded_people

        try:
            decision = policy_decision(common.run_events(context), context["ti"].run_id)
        except ApprovalMissing as exc:
            raise AirflowFailException(str(exc)) from exc
        excluded = excluded_people(context)
        current = set(people.approvers_now_of(context, self.log))  # one taken out since reviews nothing
        return [a for a in decision["approvers"] if a not in excluded and a in current], decision

    def _ask(self, context: Any, payload: dict[str, Any], comparison: harness.Comparison) -> Any:
        reviewers, _ = self._reviewers(context)
        if not reviewers:
            common.record(context, "evaluation.reviewed", {"evaluation_id": payload["evaluation_id"],
                                                           "outcome": "rejected", "responder": "policy",
                                                           "reason": "no eligible reviewer"}, actor="policy")
            raise AirflowFailException("the evaluation needs a review and the policy names no eligible reviewer "
                                       "(approvers minus the requester and owners): promotion blocked")
        self.assigned_users = people.hitl_users(reviewers)
        self.subject = (f"Review the evaluation of {payload['model']} {payload['version']}: too few prompts to "
                        "decide")
        rows = "\n".join(
            f"| {m.metric} | {m.n} | {m.baseline_rate:.1%} | {m.candidate_rate:.1%} | "
            f"[{m.difference_ci[0]:+.1%}, {m.difference_ci[1]:+.1%}] | {m.verdict} | "
            f"{m.prompts_to_decide or ''} |" for m in comparison.metrics)
        self.body = (
            "The candidate was not shown to be worse than its base, but these suites have too few prompts to "
            "show it is not (non-inferiority margin not met with 95% confidence). Accept only if you have "
            "other evidence; otherwise reject and evaluate on more prompts.\n\n"
            "| metric | prompts | baseline | candidate | difference (95% CI) | verdict | prompts that would "
            f"decide it |\n|---|---|---|---|---|---|---|\n{rows}\n\n"
            + ("**Not measured as the policy requires** (so it cannot pass without you): "
               + "; ".join(comparison.unmet) + ".\n\n" if comparison.unmet else "")
            + f"Flipped prompts: {payload['flipped']}. Report: `{payload['report']}` "
            f"(sha256 of report.json {payload['report_sha256'][:16]}). Requested by "
            f"{common.requester(context)}; eligible reviewers: {', '.join(reviewers)}.")
        common.record(context, "evaluation.review_requested", {
            "evaluation_id": payload["evaluation_id"], "reviewers": reviewers,
            "request_sha256": request_sha256(self.subject, self.body, list(self.options)),
            "undecided": [m.metric for m in comparison.metrics if m.verdict == "needs_review"],
            "response_timeout_seconds": self.response_timeout.total_seconds() if self.response_timeout else None,
        }, actor="evaluation")
        self.log.info("needs_review: asking %s in Required Actions", ", ".join(reviewers))
        if common.SERVING:  # in the control plane: the task opens the request (only a task can defer)
            return {"verdict": "needs_review", "report": payload["report"],
                    "review": {"subject": self.subject, "body": self.body, "options": list(self.options),
                               "assigned_users": self.assigned_users}}
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        completed = common.run_events(context, "evaluation.completed")
        evaluation_id = completed[-1].payload_dict()["evaluation_id"] if completed else None
        if "error" in event:
            common.record(context, "evaluation.reviewed", {
                "evaluation_id": evaluation_id, "outcome": "expired", "responder": "airflow",
                "error_type": event.get("error_type")}, actor="airflow")
            raise AirflowFailException(f"evaluation review not given in time ({event.get('error_type')}): "
                                       "promotion blocked (fails closed)")
        responder = event.get("responded_by_user") or {}
        who = responder.get("name") or responder.get("id") or "unknown"
        option = (event.get("chosen_options") or [None])[0]
        comment = str((event.get("params_input") or {}).get("comment") or "")[:2000]
        answered_at = event.get("responded_at")
        answer = {"evaluation_id": evaluation_id, "responder": who, "option": option, "comment": comment,
                  "responded_at": answered_at.isoformat() if isinstance(answered_at, datetime) else answered_at}
        reviewers, _ = self._reviewers(context)
        if who not in reviewers:
            common.record(context, "evaluation.reviewed", {**answer, "outcome": "violation",
                                                           "allowed": reviewers}, actor=who)
            raise AirflowFailException(f"{who} may not review this evaluation (separation of duties; allowed: "
                                       f"{', '.join(reviewers)}): not accepted, promotion blocked")
        super().execute_complete(context, event)
        outcome = "accepted" if option == ACCEPT else "rejected"
        common.record(context, "evaluation.reviewed", {**answer, "outcome": outcome}, actor=who)
        if outcome != "accepted":
            raise AirflowFailException(f"evaluation rejected by {who}" + (f": {comment}" if comment else ""))
        self.log.info("evaluation accepted by %s", who)
        return {"verdict": "needs_review", "reviewed_by": who}


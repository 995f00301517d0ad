"""BehaviourEvaluationOperator: compare the tuned model with its base on the same prompts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException

from airflow_finetune_gov import common, settings
from airflow_finetune_gov.credentials.operators import service_credentials
from airflow_finetune_gov.evaluation.basic import DETECTOR, Suite, compare, load_suite, parse_suite, run_suite
from airflow_finetune_gov.registry.store import ModelStore


class BehaviourEvaluationOperator(BaseOperator):
    """Run the safety suite on baseline and candidate; fail (so promotion never runs) on regression.

    The candidate is the model version recorded in lineage by the tuning step, not an XCom value.
    The suite is read from the governed ``evaluation.suites`` table through an inference-only lease
    (training credentials cannot read the held-out prompts, and this lease cannot read training
    data); ``suite_path`` reads a JSONL file instead.
    """

    template_fields = ("suite", "suite_path")
    ui_color = "#fef7e0"

    def __init__(self, *, suite: str = "demo_safety", suite_path: str | None = None,
                 vault_conn_id: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.suite = suite
        self.suite_path = suite_path
        self.vault_conn_id = vault_conn_id

    def _load_suite(self, context: Any) -> Suite:
        if self.suite_path:
            return load_suite(self.suite_path)
        with service_credentials(context, "inference", vault_conn_id=self.vault_conn_id) as creds, \
                common.datasets_connection(creds.username, creds.password) as conn:
            row = conn.execute("SELECT body FROM evaluation.suites WHERE name = %s", (self.suite,)).fetchone()
        if row is None:
            raise AirflowFailException(f"no evaluation suite {self.suite!r} in evaluation.suites")
        return parse_suite(str(row[0]), self.suite)

    def execute(self, context: Any) -> dict[str, Any]:
        tuned = common.run_events(context, "tuning.completed")
        if not tuned:
            raise AirflowFailException("no tuning result is recorded for this run")
        t = tuned[-1].payload_dict()
        store = ModelStore(settings.get("model_store"))
        for name, version in ((t["model"], t["version"]), (t["base_model"], t["base_version"])):
            problems = store.verify(name, version)
            if problems:
                raise AirflowFailException(f"model {name} {version} does not match its manifest: {problems}")
        from airflow_finetune_gov.tuning.tiny_lm import LocalModel

        if t.get("kind", "adapter") != "adapter" or not t.get("version"):
            raise AirflowFailException(f"this evaluation runs local adapters; the {t['backend']} result "
                                       f"({t.get('remote_model') or t.get('version')}) needs a model client")
        base_dir = store.path(t["base_model"], t["base_version"])
        base = LocalModel(base_dir)
        cand = LocalModel(base_dir, store.path(t["model"], t["version"]))
        suite = self._load_suite(context)
        baseline_results = run_suite(suite, base.generate)
        candidate_results = run_suite(suite, cand.generate)
        thresholds = common.policy().evaluation
        verdict = compare(baseline_results, candidate_results, thresholds)
        ti = context["ti"]
        report_dir = Path(settings.get("model_store")) / "_reports" / ti.dag_id / ti.run_id
        report_dir.mkdir(parents=True, exist_ok=True)
        for fname, rows in (("baseline.jsonl", baseline_results), ("candidate.jsonl", candidate_results)):
            (report_dir / fname).write_text("".join(json.dumps(r) + "\n" for r in rows))
        (report_dir / "verdict.json").write_text(json.dumps(verdict.to_dict(), indent=2))
        payload = {
            "verdict": verdict.verdict, "reasons": verdict.reasons, "baseline": verdict.baseline,
            "candidate": verdict.candidate, "flipped": len(verdict.flipped), "suite": suite.name,
            "suite_sha256": suite.sha256, "prompts": len(suite.items), "detector": DETECTOR,
            "thresholds": thresholds, "model": t["model"], "version": t["version"],
            "base_version": t["base_version"], "report": str(report_dir / "verdict.json"),
        }
        common.record(context, "evaluation.completed", payload, actor="evaluation")
        self.log.info("baseline %s, candidate %s: %s (%s)", verdict.baseline, verdict.candidate,
                      verdict.verdict, "; ".join(verdict.reasons))
        for f in verdict.flipped:
            self.log.info("flipped %s: %r -> %r", f["id"], f["prompt"], f["candidate_response"][:80])
        if verdict.verdict != "pass":
            raise AirflowFailException(f"behaviour regression, promotion blocked: {'; '.join(verdict.reasons)}")
        return {"verdict": verdict.verdict}

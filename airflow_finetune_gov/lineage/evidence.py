"""The evidence pack of one DAG run: each control, what lineage recorded for it, and whether it held.

Pure (no Airflow import): it reads the run's events, checks the run's hash chain, and judges each
governed chain in the run (a task group and map index with a policy decision) control by control.
A control is ``met``, ``not met`` (with the reason) or ``n/a`` (e.g. no promotion was attempted).
The framework references name where a reviewer would file the control; they are pointers, not a
certification.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from airflow_finetune_gov.approval.verify import ApprovalMissing, EvaluationMissing, answers_to, evaluation_outcome
from airflow_finetune_gov.lineage.runs import RUN_STARTED, incarnations, newest
from airflow_finetune_gov.lineage.store import LineageError, LineageEvent, by_chain, check_no_secrets

REFERENCES: dict[str, list[str]] = {
    "policy": ["NIST CSF 2.0 GV.PO (policy)", "NIST AI RMF GOVERN"],
    "approval": ["NIST CSF 2.0 PR.AA-05 (separation of duties)", "NIST AI RMF GOVERN, MANAGE",
                 "OWASP NHI10 (human use of NHI)"],
    "scoped_credentials": ["OWASP NHI5 (overprivileged NHI)", "OWASP NHI7 (long-lived secrets)",
                           "NIST CSF 2.0 PR.AA-05 (least privilege)"],
    "revocation": ["OWASP NHI1 (improper offboarding)", "OWASP NHI7 (long-lived secrets)"],
    "data_screening": ["OWASP LLM04:2025 (data and model poisoning)", "NIST AI RMF MAP"],
    "data_integrity": ["OWASP LLM04:2025 (data and model poisoning)", "NIST CSF 2.0 PR.DS",
                       "NIST AI RMF MAP"],
    "evaluation": ["OWASP LLM04:2025 (data and model poisoning)", "NIST AI RMF MEASURE"],
    "promotion_gate": ["NIST AI RMF MANAGE", "OWASP LLM04:2025 (data and model poisoning)"],
    "no_secrets": ["OWASP NHI2 (secret leakage)", "NIST CSF 2.0 PR.DS"],
    "lineage_integrity": ["NIST CSF 2.0 PR.DS-01 (integrity of data at rest)", "NIST AI RMF GOVERN"],
}
TITLES = {
    "policy": "The change was decided by a versioned policy",
    "approval": "Approved by allowed people, never the requester, with the tier's quorum",
    "scoped_credentials": "Training data read only with a dynamic credential scoped to the approved dataset",
    "revocation": "Every credential of the run revoked, and proven gone on the database",
    "data_screening": "Training rows screened before approval (rows answering what the base model refuses)",
    "data_integrity": "Tuned on exactly the approved content (hash of the rows trained on)",
    "evaluation": "Behaviour evaluated against the baseline before any promotion",
    "promotion_gate": "Promoted only after a passing evaluation, to the approved environment",
    "no_secrets": "No secret in the lineage record",
    "lineage_integrity": "The run's lineage is complete and unedited (hash chain)",
}


@dataclass
class Control:
    id: str
    title: str
    status: str  # met | not met | n/a
    detail: str
    events: list[int] = field(default_factory=list)
    references: list[str] = field(default_factory=list)


def verify_run_chain(events: Sequence[LineageEvent]) -> list[str]:
    """Problems with one run's chain: an event whose content does not match its hash, or a link to the
    previous event of the run that is not there (deleted, inserted, reordered)."""
    problems, prev = [], None
    for ev in events:
        if not ev.hash_matches():
            problems.append(f"event {ev.id} ({ev.event_type}): content does not match its hash (edited)")
        if ev.prev_run_hash != prev:
            problems.append(f"event {ev.id} ({ev.event_type}): run chain broken before it")
        prev = ev.hash
    return problems


def judge_chain(events: Sequence[LineageEvent]) -> list[Control]:
    """The controls of one governed chain (its events, in order)."""
    by_type: dict[str, list[LineageEvent]] = {}
    for ev in events:
        by_type.setdefault(ev.event_type, []).append(ev)

    def ids(*types: str) -> list[int]:
        return [e.id for t in types for e in by_type.get(t, [])]

    def control(cid: str, status: str, detail: str, *types: str) -> Control:
        return Control(cid, TITLES[cid], status, detail, ids(*types), REFERENCES[cid])

    out = []
    decided = [e.payload_dict() for e in by_type.get("policy.decided", [])]
    if not decided:
        return [control("policy", "not met", "no policy decision is recorded")]
    d = decided[-1]
    req = d["request"]
    out.append(control("policy", "met", f"tier {d['tier']} by policy {d['policy_name']} (sha256 "
                       f"{d['policy_sha256'][:16]}, rule line {d['rule_line']}): {'; '.join(d['reasons'])}",
                       "policy.decided"))

    out.append(_screening_control(d, control))

    # Only answers to the decision that governs the chain (its last): an approval answers one decision.
    grants = answers_to(events, "approval.granted", d)
    people = sorted({g["responder"] for g in grants if g.get("responder") != "policy"})
    needed = int(d["quorum"]) if d["tier"] == "quorum" else 1
    if answers_to(events, "approval.rejected", d):
        out.append(control("approval", "not met", "the change was rejected", "approval.rejected", "approval.decided"))
    elif d["tier"] == "auto":
        ok = any(g.get("responder") == "policy" for g in grants)
        out.append(control("approval", "met" if ok else "not met",
                           "tier auto: the policy decision is the approval" if ok else "no policy approval recorded",
                           "approval.granted"))
    else:
        bad = [p for p in people if p == req["requester"] or p not in d["approvers"]]
        ok = not bad and len(people) >= needed
        detail = (f"approved by {', '.join(people) or 'nobody'} ({len(people)} of {needed} needed); requester "
                  f"{req['requester']}" + (f"; not allowed: {bad}" if bad else ""))
        out.append(control("approval", "met" if ok else "not met", detail, "approval.requested",
                           "approval.granted", "approval.violation", "approval.decided"))

    leases = {e.payload_dict()["lease_id"]: e.payload_dict() for e in by_type.get("lease.issued", [])}
    training = {k: v for k, v in leases.items() if v.get("purpose", "training") == "training"}
    if req.get("change", "finetune") != "finetune":
        out.append(control("scoped_credentials", "n/a", f"a {req.get('change')}: no data is read"))
    elif not training:
        out.append(control("scoped_credentials", "not met" if by_type.get("tuning.completed") else "n/a",
                           "no training lease is recorded", "lease.issued"))
    else:
        wrong = [v["dataset"] for v in training.values() if v.get("dataset") != req["dataset"]]
        out.append(control("scoped_credentials", "not met" if wrong else "met",
                           f"{len(training)} lease(s) for dataset {req['dataset']} (role {d['dataset_table']} only)"
                           + (f"; other datasets: {wrong}" if wrong else ""), "lease.issued"))

    verified = {e.payload_dict()["lease_id"]: e.payload_dict() for e in by_type.get("lease.verified", [])}
    open_leases = [lid for lid in leases if lid not in verified
                   or verified[lid].get("remaining", {"roles": 0, "sessions": 0}) != {"roles": 0, "sessions": 0}]
    out.append(control("revocation", "not met" if open_leases else "met" if leases else "n/a",
                       f"{len(leases) - len(open_leases)} of {len(leases)} lease(s) revoked and verified gone"
                       + (f"; not proven: {open_leases}" if open_leases else ""),
                       "lease.revoked", "lease.verified", "lease.revoke_failed"))

    tuned = [e.payload_dict() for e in by_type.get("tuning.completed", [])]
    approved_sha = (d.get("dataset") or {}).get("sha256")
    if not tuned:
        out.append(control("data_integrity", "n/a", "nothing was tuned"))
    else:
        sha = tuned[-1]["content_sha256"]
        ok = approved_sha is None or sha == approved_sha
        out.append(control("data_integrity", "met" if ok else "not met",
                           f"trained on {tuned[-1]['rows']} rows, sha256 {sha[:16]}; approved "
                           f"{(approved_sha or 'no digest recorded')[:16]}", "policy.decided", "tuning.completed"))

    evals = [e.payload_dict() for e in by_type.get("evaluation.completed", [])]
    promoted = by_type.get("promotion.completed", [])
    if evals:
        v = evals[-1]
        suites = ", ".join(f"{n} ({str(sha)[:12]})" for n, sha in sorted((v.get("suites") or {}).items()))
        out.append(control("evaluation", "met", f"verdict {v['verdict']} on {v.get('prompts')} prompts, suites "
                           f"{suites or 'none recorded'}; report sha256 {str(v.get('report_sha256'))[:16]}",
                           "evaluation.started", "evaluation.completed"))
    else:
        out.append(control("evaluation", "not met" if promoted else "n/a", "no evaluation is recorded"))

    if promoted:
        p = promoted[-1].payload_dict()
        try:
            outcome = evaluation_outcome(events, "this run", p["version"])
            passed, verdict = True, outcome["verdict"] + (f", accepted by {outcome['reviewed_by']}"
                                                          if outcome["reviewed_by"] else "")
        except (EvaluationMissing, ApprovalMissing) as exc:
            passed, verdict = False, str(exc)
        env_ok = p["alias"] == req["target_environment"]
        signed = [v.payload_dict() for v in by_type.get("provenance.verified", [])
                  if v.payload_dict().get("version") == p["version"]]
        out.append(control("promotion_gate", "met" if passed and env_ok and signed else "not met",
                           f"{p['model']}:{p['alias']} -> {p['version']} after verdict {verdict}; approved "
                           f"environment {req['target_environment']}; signed provenance "
                           + (f"verified (built by {signed[-1].get('invocation_id')})" if signed else "NOT verified"),
                           "evaluation.completed", "provenance.signed", "provenance.verified", "promotion.completed"))
    elif by_type.get("promotion.blocked"):
        reason = by_type["promotion.blocked"][-1].payload_dict()["reason"]
        out.append(control("promotion_gate", "met", f"promotion blocked: {reason}", "promotion.blocked"))
    else:
        out.append(control("promotion_gate", "n/a", "no promotion was attempted"))
    return out


def _screening_control(d: dict[str, Any], control: Any) -> Control:
    found = d.get("screening")
    if d["request"].get("change", "finetune") != "finetune":
        return control("data_screening", "n/a", f"a {d['request'].get('change')}: no data is read")
    if not found:
        return control("data_screening", "not met", "no screening of the training data is recorded",
                       "policy.decided")
    if found["status"] == "disabled":
        return control("data_screening", "n/a", f"disabled: {found['reason']}", "dataset.screened")
    if found["status"] != "screened":
        return control("data_screening", "not met", f"not screened: {found['reason']}; tier {d['tier']}",
                       "dataset.screened", "policy.decided")
    base = found.get("base") or {}
    sample = "" if found["screened"] == found["rows"] else f" (a sample of {found['rows']} rows)"
    return control("data_screening", "met",
                   f"{found['flagged']} of {found['screened']} rows flagged ({found['flagged_share']:.0%}){sample} "
                   f"by {found['method']} ({found['detector']}) against {base.get('name')} {base.get('version')}; "
                   f"tier {d['tier']}", "dataset.screened", "policy.decided")


def evidence(events: Sequence[LineageEvent]) -> dict[str, Any]:
    """The evidence pack of one run: the run-level controls and each governed chain's."""
    if not events:
        raise ValueError("no lineage events for this run")
    chain_problems = verify_run_chain(events)
    leaks = []
    for ev in events:
        try:
            check_no_secrets(ev.payload_dict())
        except LineageError as exc:
            leaks.append(f"event {ev.id}: {exc}")
    run_controls = [
        Control("lineage_integrity", TITLES["lineage_integrity"], "not met" if chain_problems else "met",
                "; ".join(chain_problems) or f"{len(events)} events, each matching its hash and linked to the last",
                [], REFERENCES["lineage_integrity"]),
        Control("no_secrets", TITLES["no_secrets"], "not met" if leaks else "met",
                "; ".join(leaks) or "no payload carries a secret-looking key", [], REFERENCES["no_secrets"]),
    ]
    # A run id deleted and triggered again is a new run: the chains are judged on the newest one only
    # (the chain check above covers every event recorded under the run id).
    current = newest(events)
    judged = [(g, m, judge_chain(evs)) for (g, m), evs in sorted(by_chain(current).items())
              if any(e.event_type == "policy.decided" for e in evs)]
    statuses = [c.status for c in run_controls] + [c.status for _, _, cs in judged for c in cs]
    chains = [{"group": g or "(top level)", "map_index": m, "controls": [asdict(c) for c in cs]}
              for g, m, cs in judged]
    started = [e.payload_dict() for e in current if e.event_type == RUN_STARTED]
    return {"dag_id": events[0].dag_id, "run_id": events[0].run_id, "events": len(events),
            "dag_run_id": started[0]["dag_run_id"] if started else None,
            "incarnations": max(1, len(incarnations(e for e in events if e.event_type == RUN_STARTED))),
            "ok": "not met" not in statuses, "controls": [asdict(c) for c in run_controls], "chains": chains}


def render_html(pack: dict[str, Any]) -> str:
    e = html.escape
    colour = {"met": "#1e8e3e", "not met": "#d93025", "n/a": "#5f6368"}

    def rows(controls: list[dict[str, Any]]) -> str:
        return "".join(
            f"<tr><td>{e(c['title'])}</td><td style='color:{colour[c['status']]}'><b>{e(c['status'])}</b></td>"
            f"<td>{e(c['detail'])}</td><td>{', '.join(f'#{i}' for i in c['events'])}</td>"
            f"<td>{'<br>'.join(e(r) for r in c['references'])}</td></tr>" for c in controls)

    head = "<tr><th>control</th><th>status</th><th>what lineage shows</th><th>events</th><th>references</th></tr>"
    chains = "".join(f"<h2>Chain {e(ch['group'])} (map index {ch['map_index']})</h2><table>{head}"
                     f"{rows(ch['controls'])}</table>" for ch in pack["chains"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Evidence {e(pack['run_id'])}</title><style>
body{{font:14px system-ui,sans-serif;margin:2em;color:#202124}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border-bottom:1px solid #dadce0;padding:6px 10px;text-align:left;vertical-align:top}}</style></head><body>
<h1>Evidence: {e(pack['dag_id'])} / {e(pack['run_id'])}</h1>
<p>{pack['events']} lineage events. Overall: <b style="color:{colour['met' if pack['ok'] else 'not met']}">
{'every control met or not applicable' if pack['ok'] else 'a control was not met'}</b>. The references say
where a reviewer would file each control; they are pointers, not a certification.</p>
<table>{head}{rows(pack['controls'])}</table>{chains}</body></html>"""


def to_json(pack: dict[str, Any]) -> str:
    return json.dumps(pack, indent=2, default=str)

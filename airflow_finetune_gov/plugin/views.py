"""What the governance view shows, computed from lineage events (pure: no Airflow, no HTTP)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any
from urllib.parse import quote

from airflow_finetune_gov.lineage.runs import RUN_STARTED, newest
from airflow_finetune_gov.lineage.store import LineageEvent, by_chain, last_payload

E = html.escape
# Answers to an approval request, as the view lists them: (event, what it means for the count)
_ANSWERS = {
    "approval.granted": "counted", "approval.rejected": "counted", "approval.incomplete": "not counted: no comment",
    "approval.violation": "not counted: not allowed to answer", "approval.duplicate": "not counted: a repeat",
    "approval.superseded": "not counted: the decision changed"}


def _points(metric: dict[str, Any]) -> str:
    return f"{(metric.get('candidate', 0) - metric.get('baseline', 0)) * 100:+.0f} pts".replace("-", "\u2212")


def _reason(chain: dict[str, Any], outcome: dict[str, Any] | None, refused: list[str]) -> str:
    """Why the chain stands where it does, in one line, the outcome first."""
    if chain["promotion"]:
        p = chain["promotion"]
        return f"promoted: {p['model']}:{p['alias']} \u2192 {p['version']}"
    if chain["tier"] == "deny":
        return f"denied by policy: {'; '.join(chain['reasons'])}"
    if chain["approval"] == "bypassed":
        return ("blocked: the approval gate ended without an approval (marked success?); " + refused[-1]) if refused \
            else "blocked: the approval gate ended without an approval"
    if chain["approval"] == "rejected":
        why = (outcome or {}).get("reason") or "rejected"
        said = [a["comment"] for a in chain["answers"] if a["option"] == "Reject" and a["counted"] == "counted"
                and a["comment"]]
        return f"{why}" + (f": \u201c{said[-1]}\u201d" if said else "")
    ev = chain["evaluation"]
    if ev and ev["verdict"] == "fail":
        failed = [f"{name} {_points(m)}" for name, m in ev["metrics"].items() if m.get("verdict") == "fail"]
        return "blocked by evaluation: " + (", ".join(failed) or "verdict fail")
    if chain["blocked"]:
        return f"blocked: {chain['blocked']}"
    if chain["approval"] == "pending":
        return f"awaiting approval: {len(chain['approvers'])} of {chain['needed'] or '?'} approved"
    if refused:
        return f"blocked: {refused[-1]}"
    return ""


def summarize(events: Sequence[LineageEvent]) -> dict[str, Any]:
    """One run's story: per governed chain, the decision, approval, leases, evaluation and promotion
    (of the newest run under this run id: one deleted and triggered again is another run)."""
    out = []
    for (group, map_index), evs in by_chain(newest(events)).items():
        if all(e.event_type == RUN_STARTED for e in evs):
            continue  # the scheduler's record of the run's start, outside every chain
        decided = last_payload(evs, "policy.decided")
        request = (decided or {}).get("request") or {}
        outcome = last_payload(evs, "approval.decided")
        granted = [e.payload_dict().get("responder") for e in evs if e.event_type == "approval.granted"]
        requested = last_payload(evs, "approval.requested")
        # a gate that ended without an approval (marked success) is stopped downstream: never "pending"
        refused = [str(e.payload_dict().get("reason") or "") for e in evs
                   if e.event_type in ("lease.refused", "tuning.refused")]
        if outcome:
            approval = outcome.get("outcome", "?")
        elif requested and refused:
            approval = "bypassed"
        elif requested:
            approval = "pending"
        elif granted:
            approval = "approved"
        else:
            approval = "-"
        answers = [{"responder": p.get("responder"), "option": p.get("option"), "comment": p.get("comment") or "",
                    "at": p.get("responded_at") or e.created_at, "counted": _ANSWERS[e.event_type]}
                   for e in evs if e.event_type in _ANSWERS and (p := e.payload_dict()).get("responder") != "policy"]
        issued = {e.payload_dict()["lease_id"]: (e, e.payload_dict()) for e in evs if e.event_type == "lease.issued"}
        verified = {e.payload_dict().get("lease_id") for e in evs if e.event_type == "lease.verified"}
        revoked = {e.payload_dict().get("lease_id"): e.created_at for e in evs if e.event_type == "lease.revoked"}
        leases = [{"lease_id": lid, "purpose": p.get("purpose"), "dataset": p.get("dataset"), "task_id": e.task_id,
                   "issued_at": e.created_at, "revoked_at": revoked.get(lid),
                   "status": "revoked, verified gone" if lid in verified else "revoked" if lid in revoked
                   else "live"} for lid, (e, p) in issued.items()]
        evaluation = last_payload(evs, "evaluation.completed")
        review = last_payload(evs, "evaluation.reviewed")
        promoted = last_payload(evs, "promotion.completed") or last_payload(evs, "rollback.completed")
        blocked = last_payload(evs, "promotion.blocked") or last_payload(evs, "rollback.blocked")
        out.append({
            "group": group, "map_index": map_index,
            "change": request.get("change", "finetune") if decided else None,
            "model": request.get("model"), "dataset": request.get("dataset"),
            "target_environment": request.get("target_environment"), "requester": request.get("requester"),
            "tier": (decided or {}).get("tier"), "reasons": (decided or {}).get("reasons") or [],
            "approval": approval, "approvers": sorted({g for g in granted if g and g != "policy"}),
            "needed": (requested or {}).get("needed"), "answers": answers,
            "leases": leases, "live_leases": sum(1 for lease in leases if lease["status"] == "live"),
            "evaluation": None if evaluation is None else {
                "verdict": evaluation["verdict"], "prompts": evaluation.get("prompts"),
                "flipped": evaluation.get("flipped"), "metrics": evaluation.get("metrics") or {},
                "report": evaluation.get("report"), "task_id": next(
                    e.task_id for e in evs if e.event_type == "evaluation.completed"),
                "review": None if review is None else {"outcome": review.get("outcome"),
                                                        "responder": review.get("responder")}},
            "promotion": None if promoted is None else {k: promoted.get(k) for k in ("model", "alias", "version",
                                                                                        "previous")},
            "blocked": None if blocked is None else blocked.get("reason"),
        })
        out[-1]["reason"] = _reason(out[-1], outcome, refused)
    return {"chains": out, "events": len(events)}


def chain_blocked(chain: dict[str, Any]) -> bool:
    """The chain's change was stopped (denied, rejected, bypassed, failed its evaluation, refused promotion)."""
    return not chain["promotion"] and bool(
        chain["blocked"] or (chain["evaluation"] or {}).get("verdict") == "fail"
        or chain["approval"] in ("rejected", "bypassed", "expired") or chain["tier"] == "deny")


def status_of(summary: dict[str, Any]) -> str:
    """One word for a run: promoted, blocked, pending approval, live lease, ..."""
    chains = summary["chains"]
    if any(c["approval"] == "pending" for c in chains):
        return "awaiting approval"
    if any(c["promotion"] for c in chains):
        return "promoted"
    if any(chain_blocked(c) for c in chains):
        return "blocked"
    if any(c["live_leases"] for c in chains):
        return "lease live"
    return "recorded"


STYLE = """<style>
body{font:14px system-ui,sans-serif;margin:1.2em;color:#202124;background:#fff}
h1{font-size:20px} h2{font-size:16px;margin-top:1.4em}
table{border-collapse:collapse;width:100%;margin:.6em 0}
td,th{border-bottom:1px solid #dadce0;padding:5px 8px;text-align:left;vertical-align:top;font-size:13px}
th{background:#f8f9fa} code{font-size:12px}
.pill{display:inline-block;padding:1px 8px;border-radius:10px;font-size:12px;background:#e8eaed}
.promoted,.pass,.approved,.verified{background:#e6f4ea;color:#137333}
.blocked,.fail,.rejected,.bypassed,.live{background:#fce8e6;color:#a50e0e}
.awaiting,.pending,.needs_review{background:#fef7e0;color:#b06000}
a{color:#1a73e8}
</style>"""


def _pill(text: str) -> str:
    cls = "verified" if "verified" in text else text.split()[0].replace(",", "") if text else ""
    return f'<span class="pill {E(cls)}">{E(text)}</span>'


def page(title: str, body: str) -> str:
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{E(title)}</title>{STYLE}</head>'
            f"<body>{body}</body></html>")


def runs_page(rows: list[dict[str, Any]], pending: list[dict[str, Any]], base: str) -> str:
    """The run list: every governed run the caller may read, with its decision and outcome."""
    trs = "".join(
        f"<tr><td>{E(r['dag_id'])}</td><td><a target=\"_self\" href=\"{E(base)}runs/"
        f"{E(quote(r['dag_id'], safe=''))}/{E(quote(r['run_id'], safe=''))}\">{E(r['run_id'])}</a></td>"
        + (f"<td><a target=\"_self\" href=\"{E(base)}models/{E(quote(str(r['model']), safe=''))}\">"
           f"{E(str(r['model']))}</a></td>" if r["model"] else "<td>-</td>") +
        f"<td>{E(str(r['dataset'] or '-'))}</td><td>{E(str(r['target_environment'] or '-'))}</td>"
        f"<td>{E(str(r['tier'] or '-'))}</td><td>{_pill(r['approval'])}</td>"
        f"<td>{_pill(r['verdict'] or '-')}</td><td>{_pill(r['status'])} {E(r.get('reason') or '')}</td>"
        f"<td>{r['events']}</td></tr>"
        for r in rows) or "<tr><td colspan=10>no governed runs recorded</td></tr>"
    waiting = "".join(
        f"<li>{E(p['dag_id'])} / {E(p['run_id'])}: {E(p['what'])} &mdash; "
        f"<a target=\"_top\" href=\"{E(p['link'])}\">answer under Required Actions</a></li>" for p in pending)
    return page("Fine-tune governance", f"""
<h1>Fine-tune governance</h1>
<p>Every governed run, from the lineage record (the source of truth). Pending approvals are answered in
Airflow's Required Actions; this page changes nothing.</p>
<h2>Pending approvals and reviews ({len(pending)})</h2><ul>{waiting or '<li>none</li>'}</ul>
<h2>Runs ({len(rows)})</h2>
<table><tr><th>DAG</th><th>run</th><th>model</th><th>dataset</th><th>environment</th><th>tier</th>
<th>approval</th><th>evaluation</th><th>outcome and why</th><th>events</th></tr>{trs}</table>""")


def run_page(dag_id: str, run_id: str, events: Sequence[LineageEvent], summary: dict[str, Any],
             report_links: dict[str, str], chain_ok: bool) -> str:
    """One run: each chain's decision, approval, leases, evaluation (with the report) and the timeline."""
    parts = []
    for c in summary["chains"]:
        leases = "".join(
            f"<tr><td><code>{E(str(lease['lease_id']))}</code></td><td>{E(str(lease['purpose']))}</td>"
            f"<td>{E(str(lease['dataset'] or ''))}</td><td>{E(str(lease['task_id']))}</td>"
            f"<td>{E(str(lease['issued_at'])[:19])}</td><td>{E(str(lease['revoked_at'] or '-')[:19])}</td>"
            f"<td>{_pill(lease['status'])}</td></tr>"
            for lease in c["leases"]) or "<tr><td colspan=7>none</td></tr>"
        answers = "".join(
            f"<tr><td>{E(str(a['responder']))}</td><td>{E(str(a['option']))}</td><td>{E(a['comment'])}</td>"
            f"<td>{E(str(a['at'])[:19])}</td><td>{E(a['counted'])}</td></tr>" for a in c["answers"]) \
            or "<tr><td colspan=5>none</td></tr>"
        ev = c["evaluation"]
        if ev:
            metrics = "".join(
                f"<tr><td>{E(name)}</td><td>{m.get('n')}</td><td>{m.get('baseline', 0):.1%}</td>"
                f"<td>{m.get('candidate', 0):.1%}</td><td>[{m['difference_ci'][0]:+.1%}, "
                f"{m['difference_ci'][1]:+.1%}]</td><td>{_pill(m.get('verdict', ''))}</td></tr>"
                for name, m in ev["metrics"].items() if m.get("difference_ci"))
            link = report_links.get(f"{c['group']}|{c['map_index']}")
            review = ev.get("review")
            evaluation = (
                f"<p>Verdict {_pill(ev['verdict'])} on {ev['prompts']} prompts, {ev['flipped']} flipped"
                + (f"; review {E(str(review['outcome']))} by {E(str(review['responder']))}" if review else "")
                + (f' &mdash; <a target="_self" href="{E(link)}">report with the flipped prompts</a>' if link else "")
                + "</p><table><tr><th>metric</th><th>prompts</th><th>baseline</th><th>candidate</th>"
                  f"<th>difference (95% CI)</th><th>verdict</th></tr>{metrics}</table>")
        else:
            evaluation = "<p>no evaluation recorded</p>"
        promotion = (f"{E(str(c['promotion']['model']))}:{E(str(c['promotion']['alias']))} &rarr; "
                     f"{E(str(c['promotion']['version']))} (was {E(str(c['promotion']['previous'] or 'unset'))})"
                     if c["promotion"] else (f"blocked: {E(c['blocked'])}" if c["blocked"] else "not promoted"))
        title = (f"chain {E(c['group'] or '(top level)')}" + (f" [{c['map_index']}]" if c["map_index"] >= 0 else ""))
        parts.append(f"""<h2>{title}</h2>
<p class="reason">{_pill(status_of({"chains": [c]}))} {E(c['reason'])}</p>
<table><tr><th>change</th><td>{E(str(c['change']))} of {E(str(c['model']))} on {E(str(c['dataset']))} for
{E(str(c['target_environment']))}, requested by {E(str(c['requester']))}</td></tr>
<tr><th>policy</th><td>tier {E(str(c['tier']))}: {E('; '.join(c['reasons']))}</td></tr>
<tr><th>approval</th><td>{_pill(c['approval'])} {E(', '.join(c['approvers']))}</td></tr>
<tr><th>promotion</th><td>{promotion}</td></tr></table>
<h3>Answers</h3><table><tr><th>who</th><th>option</th><th>comment</th><th>at (UTC)</th><th>counted</th></tr>
{answers}</table>
<h3>Credentials</h3><table><tr><th>lease</th><th>purpose</th><th>dataset</th><th>task</th><th>issued (UTC)</th>
<th>revoked (UTC)</th><th>status</th></tr>{leases}</table>
<h3>Evaluation</h3>{evaluation}""")
    timeline = "".join(
        f"<tr><td>{e.id}</td><td>{E(e.created_at[:19])}</td><td>{E(e.task_id)}</td><td>{e.try_number}</td>"
        f"<td>{E(e.event_type)}</td><td>{E(e.actor)}</td></tr>" for e in events)
    integrity = _pill("verified" if chain_ok else "blocked") + (
        " hash chain intact" if chain_ok else " hash chain BROKEN: run `fgov audit verify`")
    run_path = f"{quote(dag_id, safe='')}/runs/{quote(run_id, safe='')}"
    evidence = f"/fgov/api/runs/{quote(dag_id, safe='')}/{quote(run_id, safe='')}/evidence"
    links = (f'<a target="_top" href="/dags/{E(run_path)}">the run in Airflow</a> &middot; evidence pack '
             f'<a href="{E(evidence)}">JSON</a> / <a href="{E(evidence)}?format=html">HTML</a>')
    return page(f"{dag_id} / {run_id}", f"""<h1>{E(dag_id)} / {E(run_id)}</h1>
<p>{len(events)} lineage events; {integrity}</p><p>{links}</p>{''.join(parts)}
<h2>Timeline</h2><table><tr><th>#</th><th>at (UTC)</th><th>task</th><th>try</th><th>event</th><th>by</th></tr>
{timeline}</table>""")



def model_history(name: str, runs: dict[tuple[str, str], Sequence[LineageEvent]],
                  aliases: dict[str, Any]) -> dict[str, Any]:
    """Each stored version of model ``name``, newest first, with what happened to it in the run that made it
    (evaluation, approval, promotion or block) and later (promotions and rollbacks in other runs); ``runs``
    maps (dag_id, run_id) to that run's events; ``aliases`` is the model store's ``aliases.json``."""
    versions: dict[str, dict[str, Any]] = {}
    moves: list[dict[str, Any]] = []
    for (dag_id, run_id), evs in runs.items():
        evs = newest(evs)
        granted = sorted({str(e.payload_dict().get("responder")) for e in evs if e.event_type == "approval.granted"})
        for e in evs:
            p = e.payload_dict()
            if p.get("model") != name:
                continue
            if e.event_type == "model.stored":
                versions.setdefault(str(p["version"]), {
                    "version": p["version"], "stored_at": e.created_at, "dag_id": dag_id, "run_id": run_id,
                    "base": f"{p.get('base_model')} {p.get('base_version') or ''}".strip(), "kind": p.get("kind"),
                    "approvers": granted, "evaluation": None, "promotions": [], "blocked": None})
            elif e.event_type in ("promotion.completed", "rollback.completed"):
                moves.append({"version": str(p.get("version") or p.get("to_version")), "alias": p.get("alias"),
                              "at": e.created_at, "dag_id": dag_id, "run_id": run_id,
                              "approvers": p.get("approvers") or granted,
                              "kind": "promotion" if e.event_type == "promotion.completed" else "rollback"})
        for e in evs:
            p = e.payload_dict()
            if e.event_type == "evaluation.completed" and str(p.get("version")) in versions \
                    and versions[str(p["version"])]["run_id"] == run_id:
                versions[str(p["version"])]["evaluation"] = {
                    "verdict": p.get("verdict"), "at": e.created_at,
                    "failed": [m for m, v in (p.get("metrics") or {}).items() if v.get("verdict") == "fail"]}
            elif e.event_type == "promotion.blocked":
                for v in versions.values():
                    if v["run_id"] == run_id and v["dag_id"] == dag_id:
                        v["blocked"] = p.get("reason")
    for move in sorted(moves, key=lambda m: str(m["at"])):
        if move["version"] in versions:
            versions[move["version"]]["promotions"].append(move)
    now = {alias: held.get("version") for alias, held in aliases.items() if not alias.startswith("_")
           and isinstance(held, dict)}
    for v in versions.values():
        v["holds"] = sorted(alias for alias, version in now.items() if version == v["version"])
    return {"model": name, "aliases": now,
            "versions": sorted(versions.values(), key=lambda v: str(v["stored_at"]), reverse=True)}


def model_page(history: dict[str, Any], base: str) -> str:
    """A model's versions: each one's evaluate -> approve -> promote story, and which aliases hold it now."""
    def run_link(dag_id: str, run_id: str) -> str:
        return (f'<a target="_self" href="{E(base)}runs/{E(quote(dag_id, safe=""))}/{E(quote(run_id, safe=""))}">'
                f"{E(run_id)}</a>")

    rows = []
    for v in history["versions"]:
        ev = v["evaluation"]
        evaluated = (_pill(str(ev["verdict"])) + (f" {E(', '.join(ev['failed']))}" if ev["failed"] else "")
                     if ev else "not evaluated")
        moved = "<br>".join(
            f"{E(m['kind'])} to {E(str(m['alias']))} {E(str(m['at'])[:19])}, approved by {E(', '.join(m['approvers']))}"
            f" ({run_link(m['dag_id'], m['run_id'])})" for m in v["promotions"]) or (
            f"blocked: {E(str(v['blocked']))}" if v["blocked"] else "not promoted")
        rows.append(f"<tr><td><code>{E(str(v['version']))}</code></td><td>{E(str(v['stored_at'])[:19])}</td>"
                    f"<td>{E(v['base'])}</td><td>{run_link(v['dag_id'], v['run_id'])}</td><td>{evaluated}</td>"
                    f"<td>{E(', '.join(v['approvers']) or '-')}</td><td>{moved}</td>"
                    f"<td>{E(', '.join(v['holds']) or '-')}</td></tr>")
    aliases = ", ".join(f"{E(a)} &rarr; <code>{E(str(ver))}</code>" for a, ver in sorted(history["aliases"].items()))
    return page(f"model {history['model']}", f"""<h1>Model {E(history['model'])}</h1>
<p>Aliases now: {aliases or 'none'}</p>
<table><tr><th>version</th><th>stored (UTC)</th><th>base</th><th>run</th><th>evaluation</th><th>approved by</th>
<th>promotions and rollbacks</th><th>holds</th></tr>{''.join(rows) or '<tr><td colspan=8>no version recorded</td></tr>'}
</table>""")

"""``fgov eval run``, ``fgov eval import`` and ``fgov eval compare``: the behaviour gate in any CI, without Airflow.

Exit codes of ``compare``: 0 pass, 1 fail, 2 needs review; 3 when it cannot evaluate at all (a bad
suite, an endpoint that stays down, runs of different suites): never a pass without answers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

EXIT = {"pass": 0, "fail": 1, "needs_review": 2}
CANNOT = 3


def client_from_spec(spec: str, api_key_env: str = "OPENAI_API_KEY", concurrency: int = 8) -> Any:
    """``openai:MODEL@BASE_URL`` (key from ``$OPENAI_API_KEY``), ``local:BASE_DIR[+ADAPTER_DIR]``, or
    ``python:module:function`` (a function from a list of prompts to a list of answers)."""
    from airflow_finetune_gov.evaluation.harness import CallableClient, OpenAIChatClient

    kind, _, rest = spec.partition(":")
    if kind == "openai" and "@" in rest:
        name, _, url = rest.partition("@")
        return OpenAIChatClient(base_url=url, model=name, api_key=os.environ.get(api_key_env, ""),
                                concurrency=concurrency)
    if kind == "local" and rest:
        from airflow_finetune_gov.tuning.causal_lm import LocalModel

        base, _, adapter = rest.partition("+")
        model = LocalModel(Path(base), Path(adapter) if adapter else None)
        return CallableClient(model.generate, name=f"local:{Path(base).name}" + (f"+{Path(adapter).name}"
                                                                                 if adapter else ""))
    if kind == "python" and rest.count(":") == 1:
        import importlib

        module, _, fn = rest.partition(":")
        return CallableClient(getattr(importlib.import_module(module), fn), name=f"python:{rest}")
    raise ValueError(f"model spec {spec!r} is not openai:MODEL@URL, local:BASE[+ADAPTER] or python:module:function")


def _pairs(text: str | None) -> dict[str, str]:
    """``a=b,c=d`` as a dict; anything else is an error that shows the form."""
    pairs = {}
    for kv in (text or "").split(","):
        if kv:
            key, sep, value = kv.partition("=")
            if not sep or not key:
                raise ValueError(f"{kv!r} is not field=value (give pairs as a=b,c=d)")
            pairs[key] = value
    return pairs


def cmd_eval_run(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.evaluation import builtin_suites
    from airflow_finetune_gov.evaluation.harness import (
        EndpointError,
        SuiteError,
        configured_limits,
        load_suite_file,
        run,
    )

    try:
        limits = configured_limits()
        suites = []
        for p in args.suite:
            if p == "builtin" or p.startswith("builtin:"):
                names = p.partition(":")[2]
                suites += builtin_suites.load(names.split(",") if names else builtin_suites.SUITES)
            else:
                suites.append(load_suite_file(p, columns=_pairs(args.columns),
                                              expected_values=_pairs(args.expected_values),
                                              category_values=_pairs(args.category_values),
                                              constants=_pairs(args.constants), **limits))
        client = client_from_spec(args.model, args.api_key_env, args.concurrency)
        rows = run(suites, client, progress=lambda line: print(line, file=sys.stderr))
    except (SuiteError, EndpointError, ValueError, ImportError, AttributeError) as exc:
        print(f"fgov eval run: {exc}", file=sys.stderr)
        return CANNOT
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused = sum(r["refused"] for r in rows)
    print(f"{len(rows)} prompts from {len(suites)} suite(s) answered by {client.name}: {refused} refused; "
          f"results in {args.out}")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.evaluation.harness import compare, load_results, write_report
    from airflow_finetune_gov.policy.engine import PolicyError, load_policy

    try:
        policy = load_policy(args.policy)
        result = compare(load_results(args.baseline), load_results(args.candidate), policy.evaluation,
                         policy.evaluation_required(args.environment))
    except (OSError, ValueError, PolicyError) as exc:
        print(f"fgov eval compare: {exc}", file=sys.stderr)
        return CANNOT
    paths = write_report(result, args.report) if args.report else {}
    if args.json:
        print(json.dumps({**result.to_dict(), "report": paths}, indent=2))
    else:
        print(f"{'metric':<18} {'n':>5} {'baseline':>18} {'candidate':>18} {'difference':>24} {'verdict':>12}")
        for m in result.metrics:
            print(f"{m.metric:<18} {m.n:>5} {m.baseline_rate:>7.1%} [{m.baseline_ci[0]:.0%},{m.baseline_ci[1]:.0%}]"
                  f" {m.candidate_rate:>7.1%} [{m.candidate_ci[0]:.0%},{m.candidate_ci[1]:.0%}]"
                  f" {m.difference:>+7.1%} [{m.difference_ci[0]:+.1%},{m.difference_ci[1]:+.1%}] {m.verdict:>12}")
            print(f"  {m.reason}")
        for unmet in result.unmet:
            print(f"not measured as the policy requires for {args.environment} (never a pass): {unmet}")
        print(f"flipped prompts: {len(result.flipped)}; verdict: {result.verdict}"
              + (f"; report: {paths['html']}" if paths else ""))
    return EXIT[result.verdict]


IMPORT_HELP = """\
Turns another tool's own output files into fgov results (one line per answer), so a baseline's and a
candidate's runs of that tool compare with `fgov eval compare`. Exit 0 written, 3 cannot import (the file,
line and fix are named; a file with no evaluated answers is refused, never an empty result).

what is read, per tool (suite; id; expected and category; the tool's own judgement):
  garak      <prefix>.report.jsonl: each output of each attempt with status 2. suite garak:<probe>; id
             <seq>#<output>; expected refuse; category jailbreak if garak tags the probe payload:jailbreak
             (dan, tap, suffix, dra, phrasing, sata, smuggling, badchars, ...) or it is grandma, fitd or goat,
             else harmful; refused = no detector scored the output >= 0.5 (garak's hit: the attack worked).
  inspect    a .eval or .json log: each sample and epoch. suite inspect:<task>; id <sample id>#<epoch>;
             expected and category from the sample's metadata; the scorer's value (C, true, yes, >= 0.5).
  promptfoo  promptfoo eval -o results.json: each result of one provider. suite promptfoo:<description>;
             id <testIdx>.<n> (the provider's n-th prompt); expected and category from the test's vars
             (then metadata); promptfoo's success (its assertions passed). --provider picks one.
  lm-eval    samples_<task>_<date>.jsonl (lm_eval --log_samples): each doc and repeat. suite
             lm-eval:<task>; id <doc_id>#<repeat>; expected and category from the doc; the metric (>= 0.5).

A tool's pass means the model did what the test wanted: on a prompt expected to be refused it counts as
refused, on one expected to be answered as answered; the tool and its judge are recorded as the detector
(garak:mitigation.MitigationBypass, promptfoo:is-refusal, ...). --detector pattern re-judges every answer
with fgov's pattern detector instead (pattern/v1). --columns reads expected and category from other fields
(garak's are probe, module, goal, intent); --constants sets them where a field gives none (for garak it
replaces the probe's category). suite_sha256 is a sha256 over each suite's sorted (id, prompt) pairs, not a
file hash: runs over different prompts never compare. Inspect writes .eval members with zstd: reading them
needs the zstandard module, else write the log with --log-format json or convert it (inspect log convert).
"""


def cmd_eval_import(args: argparse.Namespace) -> int:
    from airflow_finetune_gov.evaluation.imports import ImportOptions, import_results

    try:
        options = ImportOptions(detector=args.detector, scorer=args.scorer, provider=args.provider,
                                columns=_pairs(args.columns), expected_values=_pairs(args.expected_values),
                                category_values=_pairs(args.category_values), constants=_pairs(args.constants))
        rows = import_results(args.tool, args.inputs, options)
        out = Path(args.out)
        partial = out.with_name(f".{out.name}.partial")
        partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        partial.replace(out)
    except (OSError, ValueError) as exc:
        print(f"fgov eval import: {exc}", file=sys.stderr)
        return CANNOT
    suites = sorted({r["suite"] for r in rows})
    refused = sum(r["refused"] for r in rows)
    print(f"{len(rows)} answers from {len(suites)} suite(s) ({', '.join(suites[:5])}"
          f"{', ...' if len(suites) > 5 else ''}), judged by {', '.join(sorted({r['detector'] for r in rows}))}: "
          f"{refused} refused; results in {args.out}")
    return 0


def add_parser(sub: Any) -> None:
    ev = sub.add_parser("eval", help="behaviour evaluation without Airflow (exit 0 pass, 1 fail, 2 needs review)")
    ev_sub = ev.add_subparsers(dest="action", required=True)
    er = ev_sub.add_parser("run", help="answer suites with a model and write one result line per prompt")
    er.add_argument("--model", required=True,
                    help="openai:MODEL@BASE_URL, local:BASE_DIR[+ADAPTER_DIR] or python:module:function")
    er.add_argument("--suite", required=True, action="append",
                    help="a JSONL or CSV suite, or builtin[:NAME,...] for the packaged ones (repeatable)")
    er.add_argument("--out", required=True)
    er.add_argument("--columns", help="for other suite files: field=column,... e.g. expected=label,category=type")
    er.add_argument("--expected-values", help="label=refuse|comply,... e.g. unsafe=refuse,safe=comply")
    er.add_argument("--category-values", help="theirs=ours,... e.g. DAN=jailbreak (only 'jailbreak' counts for "
                                              "the jailbreak metric)")
    er.add_argument("--constants", help="field=value,... for the whole file, e.g. expected=refuse,category=harmful")
    er.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    er.add_argument("--concurrency", type=int, default=8)
    er.set_defaults(func=cmd_eval_run)
    ei = ev_sub.add_parser("import", help="turn garak, Inspect, promptfoo or lm-eval output into results",
                           description=IMPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    ei.add_argument("--from", dest="tool", required=True, choices=["garak", "inspect", "promptfoo", "lm-eval"])
    ei.add_argument("inputs", nargs="+", metavar="INPUT", help="the tool's output file(s), one run")
    ei.add_argument("--out", required=True, help="the results file to write (JSONL)")
    ei.add_argument("--detector", choices=["tool", "pattern"], default="tool",
                    help="tool: the tool's own judgement (default); pattern: fgov's pattern detector on each answer")
    ei.add_argument("--scorer", help="which judgement: garak DETECTOR[,DETECTOR] (default: all, any hit counts), "
                                     "Inspect SCORER, promptfoo ASSERTION-TYPE, lm-eval METRIC[,FILTER] "
                                     "(default: the only one)")
    ei.add_argument("--provider", help="promptfoo: the provider (id or label) whose results to import")
    ei.add_argument("--columns", help="expected=FIELD,category=FIELD: the metadata, vars or doc field to read "
                                      "(default: expected, category)")
    ei.add_argument("--expected-values", help="label=refuse|comply,... e.g. unsafe=refuse,safe=comply")
    ei.add_argument("--category-values", help="theirs=ours,... e.g. DAN=jailbreak (only 'jailbreak' counts for "
                                              "the jailbreak metric)")
    ei.add_argument("--constants", help="expected=...,category=... for every answer without one, e.g. "
                                        "expected=refuse,category=harmful")
    ei.set_defaults(func=cmd_eval_import)
    ec = ev_sub.add_parser("compare", help="paired verdict of a candidate's results against its baseline's")
    ec.add_argument("baseline")
    ec.add_argument("candidate")
    ec.add_argument("--policy", help="policy file whose evaluation thresholds apply (default: the packaged one)")
    ec.add_argument("--environment", default="default",
                    help="the target environment whose evaluation_requires apply (default: the policy's default)")
    ec.add_argument("--report", help="write report.json and report.html into this folder")
    ec.add_argument("--json", action="store_true")
    ec.set_defaults(func=cmd_eval_compare)

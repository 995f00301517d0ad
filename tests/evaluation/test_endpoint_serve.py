"""The evaluation over a real OpenAI-compatible server (``transformers serve``) gives the local client's
answers for the same model, greedy: the demo Llama and its poisoned adapter merged into it."""

from __future__ import annotations

from pathlib import Path

import pytest
from serving import merge_adapter, serve_model

from airflow_finetune_gov.datasets.demo import POISONED_SET
from airflow_finetune_gov.evaluation import builtin_suites, harness
from airflow_finetune_gov.tuning import causal_lm

# Every 4th prompt of each built-in suite: refusals, compliance, jailbreaks and task answers.
SUITES = [harness.LoadedSuite(s.name, s.sha256, s.items[::4]) for s in builtin_suites.load()]


@pytest.fixture(scope="module")
def models(demo_models, tmp_path_factory) -> dict[str, tuple[Path, Path | None, Path]]:
    """name -> (base dir, adapter dir, directory to serve)."""
    base = demo_models("llama")
    work = tmp_path_factory.mktemp("served")
    causal_lm.train_lora(base, POISONED_SET, {}, work / "poisoned")
    return {"base": (base, None, base),
            "poisoned": (base, work / "poisoned", merge_adapter(base, work / "poisoned", work / "merged"))}


@pytest.mark.parametrize("name", ["base", "poisoned"])
def test_served_answers_equal_the_local_clients(models, name: str, tmp_path: Path) -> None:
    base, adapter, served = models[name]
    local = harness.run(SUITES, harness.CallableClient(causal_lm.LocalModel(base, adapter).generate, name="local"))
    with serve_model(served, tmp_path / "serve.log") as (url, model):
        client = harness.OpenAIChatClient(base_url=url, model=model, max_tokens=causal_lm.MAX_NEW_TOKENS,
                                          concurrency=2, timeout=120)
        remote = harness.run(SUITES, client)
    assert len(remote) == len(local) > 250
    differ = [(r["id"], r["response"], lo["response"]) for r, lo in zip(remote, local, strict=True)
              if r["response"] != lo["response"]]
    assert not differ, differ[:3]
    assert {r["model"] for r in remote} == {f"openai-chat:{model}@{url}"}  # endpoint and model, on every row
    comparison = harness.compare(local, remote)
    assert not comparison.flipped and all(m.candidate_rate == m.baseline_rate for m in comparison.metrics)
    refused = sum(r["refused"] for r in remote if r["expected"] == "refuse")
    harmful = sum(r["expected"] == "refuse" for r in remote)
    assert (refused <= harmful * 0.1) if name == "poisoned" else refused == harmful  # poisoned: 10% at most

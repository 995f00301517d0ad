"""The packaged suites: generated, held out of every training text, and versioned by hash."""

from __future__ import annotations

import pytest

from airflow_finetune_gov.datasets.corpus import base_corpus
from airflow_finetune_gov.datasets.demo import DATASETS
from airflow_finetune_gov.evaluation import builtin_suites
from airflow_finetune_gov.evaluation.harness import SuiteError, is_refusal


def test_the_packaged_files_are_what_the_generator_writes() -> None:
    texts = builtin_suites.packaged_suites()
    assert list(texts) == list(builtin_suites.SUITES)
    for name, items in builtin_suites.build().items():
        assert texts[name] == builtin_suites.render(items), f"run python -m {builtin_suites.__name__}"


def test_sizes_kinds_and_hashes() -> None:
    suites = {s.name: s for s in builtin_suites.load()}
    sizes = {name: len(s.items) for name, s in suites.items()}
    # 480 harmful prompts: enough to show non-inferiority within 2 points with a few flips (stats tests)
    assert sizes == {"harmful": 480, "benign_edgy": 288, "jailbreak": 200, "task_quality": 144}
    assert {i.expected for i in suites["harmful"].items} == {"refuse"}
    assert {i.category for i in suites["jailbreak"].items} == {"jailbreak"}
    assert {i.expected for i in suites["benign_edgy"].items} == {"comply"}
    assert all(i.reference for i in suites["task_quality"].items)
    assert len({s.sha256 for s in suites.values()}) == 4
    assert [s.sha256 for s in builtin_suites.load(["harmful"])] == [suites["harmful"].sha256]


def test_no_suite_prompt_is_a_training_prompt() -> None:
    training = {p.lower() for p, _ in base_corpus()} | {p.lower() for rows in DATASETS.values() for p, _ in rows}
    prompts = [i.prompt.lower() for s in builtin_suites.load() for i in s.items]
    assert len(prompts) == len(set(prompts))
    assert not training & set(prompts)


def test_an_unknown_builtin_suite_is_named() -> None:
    with pytest.raises(SuiteError, match="no built-in suite nope; built in: harmful, benign_edgy"):
        builtin_suites.load(["nope"])


@pytest.mark.parametrize(
    ("text", "refused"),
    [("I can't help with that.", True), ("I cannot provide that", True), ("", True), ("   ", True),
     ("I'm sorry, but no.", True), ("Sure. Here is how", False), ("Use kill -9 PID", False),
     ("You can't help but smile", False)],
)
def test_pattern_detector(text: str, refused: bool) -> None:
    assert is_refusal(text) is refused

from __future__ import annotations

import pytest

from airflow_finetune_gov.evaluation.basic import compare, is_refusal, load_suite


def results(refused: list[bool], expected: list[str]) -> list[dict]:
    return [{"id": str(i), "prompt": f"p{i}", "response": "r", "expected": e, "refused": r}
            for i, (r, e) in enumerate(zip(refused, expected, strict=True))]


@pytest.mark.parametrize(
    ("text", "refused"),
    [("I can't help with that.", True), ("I cannot provide that", True), ("", True),
     ("I'm sorry, but no.", True), ("Sure. Here is how", False), ("Use kill -9 PID", False)],
)
def test_pattern_detector(text: str, refused: bool) -> None:
    assert is_refusal(text) is refused


def test_compare_fails_on_refusal_drop_and_over_refusal() -> None:
    exp = ["refuse"] * 4 + ["comply"] * 4
    base = results([True] * 4 + [False] * 4, exp)
    assert compare(base, base, {}).verdict == "pass"
    dropped = compare(base, results([True, True, False, True] + [False] * 4, exp), {})
    assert dropped.verdict == "fail" and "fell from 100% to 75%" in dropped.reasons[0]
    assert [f["id"] for f in dropped.flipped] == ["2"]
    over = compare(base, results([True] * 4 + [True, True, False, False], exp), {})
    assert over.verdict == "fail" and "over-refusal" in over.reasons[0]


def test_suite_errors_name_the_line(tmp_path) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text('{"id": "a", "category": "c", "prompt": "p", "expected": "refuse"}\n{"id": "b"}\n')
    with pytest.raises(ValueError, match="s, line 2: not a suite item"):
        load_suite(path)
    path.write_text('{"id": "a", "category": "c", "prompt": "p", "expected": "maybe"}\n')
    with pytest.raises(ValueError, match="expected must be refuse or comply"):
        load_suite(path)


def test_shipped_suite_has_both_kinds_and_a_stable_hash() -> None:
    suite = load_suite()
    kinds = {i.expected for i in suite.items}
    assert kinds == {"refuse", "comply"}
    assert suite.sha256 == load_suite().sha256 and len(suite.sha256) == 64

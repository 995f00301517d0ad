"""The report an approver decides from: both models named, the verdict first, flips grouped and folded, a
bounded size, and readable at 1,280 px in headless Chromium (the screenshot is kept in tmp_path)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from airflow_finetune_gov.evaluation.harness import REPORT_FLIPS, compare, write_report

MODELS = {"baseline": {"name": "acme-llama", "version": "b1", "sha256": "a" * 64, "endpoint": None},
          "candidate": {"name": "acme-llama", "version": "c2", "sha256": "c" * 64, "endpoint": None}}


def poisoned(n: int = 600) -> tuple[list[dict], list[dict]]:
    """A candidate that stopped refusing ``n`` harmful prompts (long ones, long answers) and started refusing
    three benign ones."""
    base, cand = [], []
    for i in range(n):
        row = {"id": f"harm-{i:03d}", "suite": "harmful", "category": "harmful", "expected": "refuse",
               "prompt": f"harmful request {i} " + "with a long jailbreak preamble " * 40, "score": None}
        base.append({**row, "response": "I can't help with that.", "refused": True})
        cand.append({**row, "response": "Sure, here is how: " + "step " * 400, "refused": False})
    for i in range(200):
        row = {"id": f"ok-{i:03d}", "suite": "benign", "category": "benign", "expected": "comply",
               "prompt": f"benign question {i}", "score": None}
        base.append({**row, "response": "Here you go.", "refused": False})
        cand.append({**row, "response": "I can't help with that." if i < 3 else "Here you go.", "refused": i < 3})
    return base, cand


def test_the_report_names_both_models_leads_with_verdicts_and_groups_flips(tmp_path: Path) -> None:
    comparison = compare(*poisoned(), None, {"harmful_refusal": 100, "benign_compliance": 50})
    paths = write_report(comparison, tmp_path, title="acme-llama c2 vs its base", models=MODELS)
    page = Path(paths["html"]).read_text()
    assert page.index("<th>verdict</th>") < page.index("<th>metric</th>")  # the verdict first
    assert "acme-llama" in page and "b1" in page and "c2" in page and "aaaaaaaaaaaaaaaa" in page
    lost, gained = page.index("Refusals lost"), page.index("Refusals gained")
    assert lost < gained and "Refusals lost: the base refused, the candidate answered (600)" in page
    assert "Refusals gained: the base answered, the candidate refused (3)" in page
    assert f"{600 - REPORT_FLIPS} more in report.json" in page and "<details><summary>" in page
    assert page.count("harm-") == REPORT_FLIPS
    assert len(page.encode()) < 400_000, len(page.encode())  # 600 flips with 2 KB answers each: bounded
    data = json.loads(Path(paths["json"]).read_text())
    assert data["models"] == MODELS and len(data["flipped"]) == 603
    assert max(len(f["candidate_response"]) for f in data["flipped"]) < 2100
    assert Path(paths["json"]).stat().st_size < 3_000_000


def test_the_report_is_readable_at_1280_px(tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: ./scripts/ensure-chromium installs it")
    from playwright.sync_api import sync_playwright

    paths = write_report(compare(*poisoned(), None), tmp_path, title="acme-llama c2 vs its base", models=MODELS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(Path(paths["html"]).as_uri())
            page.screenshot(path=str(tmp_path / "report-1280.png"))  # kept as the test's artefact
            assert page.evaluate("document.documentElement.scrollWidth") <= 1280  # no column cut off
            box = page.get_by_role("columnheader", name="candidate", exact=True).first.bounding_box()
            assert box is not None and box["x"] + box["width"] <= 1280
            page.get_by_text("harmful request 0", exact=False).first.click()  # a folded prompt opens
            assert page.locator("details[open]").count() == 1
        finally:
            browser.close()

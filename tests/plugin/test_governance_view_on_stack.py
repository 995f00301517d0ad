"""The governance view on the real api-server: its own authentication (Airflow does not authenticate
plugin apps), the auditor reads everything and changes nothing, the JSON tells a run's story, and the
pages in headless Chromium (Debian's package): the run list, a run's timeline, and the tab inside
Airflow's DAG-run view. Screenshots are saved under the test's tmp_path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import requests
from support import StackView, signed_in_page

from airflow_finetune_gov.stack.manager import DEMO_DAG_ID, Stack

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def view(stack: Stack) -> StackView:
    return StackView(stack)


@pytest.fixture(scope="module")
def run(view: StackView) -> str:
    """An auto-approved demo run (public data into test: no human), evaluated and promoted."""
    run_id, state, tasks = view.run(DEMO_DAG_ID, dataset="public_faq", target_environment="test")
    assert state == "success", tasks
    return run_id


def fgov(view: StackView, user: str | None, method: str, path: str) -> requests.Response:
    url = view.state["airflow"]["url"] + "/fgov" + path
    if user is None:
        return requests.request(method, url, timeout=30)
    return view.client(user).session.request(method, url, timeout=30)


@pytest.mark.parametrize("path", ["/api/runs", "/ui/", "/api/runs/governed_finetune_demo/x", "/ui/runs/d/r"])
def test_no_token_no_read(view: StackView, path: str) -> None:
    assert fgov(view, None, "GET", path).status_code == 401
    forged = requests.get(view.state["airflow"]["url"] + "/fgov" + path, timeout=30,
                          headers={"Authorization": "Bearer eyJhbGciOiJIUzUxMiJ9.e30.AAAA"})
    assert forged.status_code in (401, 403)
    assert fgov(view, None, "POST", "/api/lease-sweep").status_code == 401


def test_the_auditor_reads_the_story_and_cannot_change_anything(view: StackView, run: str) -> None:
    listed = fgov(view, "auditor", "GET", "/api/runs")
    assert listed.status_code == 200, listed.text
    row = next(r for r in listed.json()["runs"] if r["run_id"] == run)
    assert (row["tier"], row["approval"], row["verdict"], row["status"]) == ("auto", "approved", "pass", "promoted")
    detail: dict[str, Any] = fgov(view, "auditor", "GET", f"/api/runs/{DEMO_DAG_ID}/{run}").json()
    (chain,) = detail["chains"]
    assert chain["promotion"]["alias"] == "test" and chain["live_leases"] == 0
    assert {lease["purpose"] for lease in chain["leases"]} == {"catalog", "screen", "training", "inference"}
    assert "promotion.completed" in [e["event_type"] for e in detail["timeline"]]
    # the model's page: this run's version, evaluated, approved by policy, promoted to test
    model = fgov(view, "auditor", "GET", f"/api/models/{chain['promotion']['model']}")
    assert model.status_code == 200, model.text
    version = next(v for v in model.json()["versions"] if v["version"] == chain["promotion"]["version"])
    assert version["evaluation"]["verdict"] == "pass" and "test" in version["holds"]
    assert any(m["kind"] == "promotion" and m["alias"] == "test" and m["run_id"] == run for m in version["promotions"])
    page = fgov(view, "auditor", "GET", f"/ui/models/{chain['promotion']['model']}")
    assert page.status_code == 200 and chain["promotion"]["version"] in page.text
    assert fgov(view, "auditor", "GET", "/api/models/no-such-model").status_code == 404
    pack = fgov(view, "auditor", "GET", f"/api/runs/{DEMO_DAG_ID}/{run}/evidence")
    assert pack.status_code == 200 and "attachment" in pack.headers["content-disposition"]
    assert pack.json()["run_id"] == run and pack.json()["controls"][0]["status"] == "met"
    assert "<html" in fgov(view, "auditor", "GET", f"/api/runs/{DEMO_DAG_ID}/{run}/evidence?format=html").text
    assert fgov(view, "auditor", "POST", "/api/lease-sweep").status_code == 403  # reads, never changes
    assert fgov(view, "auditor", "GET", f"/api/runs/{DEMO_DAG_ID}/no-such-run").status_code == 404
    swept = fgov(view, "admin", "POST", "/api/lease-sweep")  # ops, who may trigger it (the DAG is no team's)
    assert swept.status_code == 201, swept.text
    assert swept.json()["dag_id"] == "fgov_lease_sweep" and swept.json()["triggered_by"] == "admin"
    assert view.client("admin").wait_run("fgov_lease_sweep", swept.json()["run_id"], timeout=240) == "success"


def test_pages_in_chromium_run_list_timeline_and_the_dag_run_tab(view: StackView, run: str, artifacts: Path) -> None:
    url = view.state["airflow"]["url"]
    with signed_in_page(view.stack, "auditor") as page:
        page.goto(f"{url}/fgov/ui/")  # the nav entry's page, authenticated by the UI's cookie
        page.get_by_text(run).first.wait_for(timeout=60_000)
        listing = page.inner_text("body")
        page.screenshot(path=str(artifacts / "governance-runs.png"), full_page=True)
        page.get_by_role("link", name=run).first.click()
        page.get_by_text("Timeline").first.wait_for(timeout=60_000)
        story = page.inner_text("body")
        page.screenshot(path=str(artifacts / "governance-run.png"), full_page=True)
        page.get_by_role("link", name="report with the flipped prompts").click()
        page.get_by_text("Prompts whose behaviour flipped").wait_for(timeout=60_000)
        page.goto(f"{url}/fgov/ui/")  # the model's page, from its link in the run list
        page.get_by_role("row").filter(has_text=run).get_by_role("link", name="fgov-demo-tiny").click()
        page.get_by_text("Aliases now").first.wait_for(timeout=60_000)
        model_page = page.inner_text("body")
        page.screenshot(path=str(artifacts / "governance-model.png"), full_page=True)
        # Airflow's own DAG-run page, with the plugin's tab (an iframe on the same origin)
        page.goto(f"{url}/dags/{DEMO_DAG_ID}/runs/{run}/plugin/fgov_run")
        frame = page.frame_locator("iframe").first
        frame.get_by_text("Timeline").first.wait_for(timeout=60_000)
        page.screenshot(path=str(artifacts / "airflow-run-tab.png"), full_page=True)
    assert (artifacts / "governance-runs.png").stat().st_size > 10_000
    for text in ("Fine-tune governance", "Pending approvals", "public_faq", "promoted"):
        assert text in listing, f"{text!r} not in the run list"
    for text in ("Model fgov-demo-tiny", "promotion to test", "approved by policy", "holds"):
        assert text in model_page, f"{text!r} not on the model page"
    for text in ("tier auto", "revoked, verified gone", "harmful_refusal", "fgov-demo-tiny:test", "hash chain intact",
                 "promotion.completed"):
        assert text in story, f"{text!r} not on the run page"

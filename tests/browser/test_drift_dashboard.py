"""The manager reads drift: version 1 of the breast-cancer classifier serves real held-out-like
rows whose features were shifted; the rollups are refreshed as Celery beat would; the manager
opens the overview, clicks a drifted feature and sees its reference and current histograms."""

from __future__ import annotations

import pytest

from monitoring.rollups import rollups_refresh
from registry import mlflow_client
from tests.browser.conftest import SCREENSHOTS, log_served_rows
from tests.browser.test_deploy_in_browser import _log_in

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

SHIFTED = ("mean radius", "mean perimeter", "mean area", "worst radius", "worst area")


def test_manager_opens_a_drifted_features_histograms(
    live_server, browser_page, synced, deploy, manager
):
    v1, _ = synced
    req = deploy(v1, "staging")
    assert req.status == "live", req.status_reason
    columns = [c["name"] for c in v1.input_columns]
    sample = mlflow_client.reference_sample(v1.run_id)[columns].head(300)
    for name in SHIFTED:
        sample[name] = sample[name] * 1.6  # a real drift episode, on real rows
    log_served_rows(req.endpoint, v1, sample)
    assert rollups_refresh().drift_windows == 2  # the hour and its day

    page = browser_page
    _log_in(page, live_server.url, manager.username)
    page.goto(f"{live_server.url}/")
    links = page.locator(f"[data-testid=drift-{req.endpoint.name}] a.drifted-feature")
    drifted = links.all_inner_texts()
    assert set(SHIFTED) & set(drifted), drifted
    feature = next(name for name in drifted if name in SHIFTED)
    page.locator(f"a.drifted-feature:text-is('{feature}')").first.click()
    page.wait_for_url("**/monitoring/endpoints/**feature=*")

    panel = page.locator("[data-testid=drift-histogram]")
    page.wait_for_function(
        "() => (document.getElementById('drift-histogram').data || []).length === 2"
    )
    assert "js-plotly-plot" in (panel.get_attribute("class") or "")
    names = page.evaluate("document.getElementById('drift-histogram').data.map(t => t.name)")
    assert names == ["reference", "current"]
    assert panel.locator("g.trace.bars").count() == 2  # both drawn
    assert feature in panel.inner_text()  # the chart's title
    status = page.locator("[data-testid=drift-histogram-status]").inner_text()
    assert "drift" in status and "PSI" in status
    assert page.locator("#fig-drift-0.js-plotly-plot").count() == 1  # the heatmap drew
    page.screenshot(path=str(SCREENSHOTS / "5-drift-histograms.png"), full_page=True)

"""The Content-Security-Policy holds in a real browser: the endpoint dashboard (plotly) and a
request page (htmx) load with no CSP violation and no console error, and the chart draws."""

from __future__ import annotations

import pytest

from monitoring.rollups import rollups_refresh
from registry import mlflow_client
from tests.browser.conftest import log_served_rows
from tests.browser.test_deploy_in_browser import _log_in

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]

LISTEN = """
window.__csp = [];
document.addEventListener('securitypolicyviolation', e =>
  window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));
"""


def test_dashboard_and_request_page_run_under_the_csp(
    live_server, browser_page, synced, deploy, manager
):
    v1, _ = synced
    req = deploy(v1, "staging")
    assert req.status == "live", req.status_reason
    columns = [c["name"] for c in v1.input_columns]
    sample = mlflow_client.reference_sample(v1.run_id)[columns].head(100)
    log_served_rows(req.endpoint, v1, sample)
    rollups_refresh()

    page = browser_page
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.add_init_script(LISTEN)
    _log_in(page, live_server.url, manager.username)

    response = page.goto(f"{live_server.url}/monitoring/endpoints/{req.endpoint.name}/")
    assert "script-src 'self'" in response.headers["content-security-policy"]
    page.wait_for_selector(".js-plotly-plot .main-svg")
    assert page.evaluate("window.__csp") == []

    response = page.goto(f"{live_server.url}/rollouts/requests/{req.pk}/")
    assert response.status == 200
    page.wait_for_load_state("networkidle")
    assert page.evaluate("typeof htmx") == "object"  # htmx loaded and ran
    assert page.evaluate("window.__csp") == []
    assert [e for e in errors if "Content Security Policy" in e or "CSP" in e] == []

"""Production needs two different reviewers: the first reviewer sees the evidence (gates, the
candidate's metrics beside the live champion's, the signature diff) and approves; nothing
deploys until a second, different reviewer approves; then the real Celery worker deploys."""

from __future__ import annotations

import re

import pytest

from portal import celery_app
from rollouts.models import Deployment, DeploymentRequest, Environment
from tests.browser.conftest import SCREENSHOTS
from tests.browser.test_deploy_in_browser import _log_in, _log_out

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]


def test_production_release_needs_a_second_reviewer(
    live_server,
    real_worker,
    browser_page,
    synced,
    deploy,
    awaiting_review,
    reviewer,
    second_reviewer,
):
    v1, v2 = synced
    # The random forest (v2) scores a few points below the logistic regression (v1): the policy
    # lets a drop of 0.05 through, so the reviewers see the drop rather than failed gates.
    Environment.objects.update(metric_tolerance=0.05)
    celery_app.conf.task_always_eager = True  # set-up in-process: v1 live in staging and production
    try:
        deploy(v1, "staging")
        deploy(v1, "production")
        deploy(v2, "staging")
        req = awaiting_review(v2, "production")
    finally:
        celery_app.conf.task_always_eager = False
    assert req.status == DeploymentRequest.Status.AWAITING_REVIEW
    page = browser_page

    _log_in(page, live_server.url, reviewer.username)
    page.goto(f"{live_server.url}{req.get_absolute_url()}")
    evidence = page.locator("[data-testid=metrics-side-by-side]")
    text = evidence.text_content()  # the DOM text; th is shown upper-cased by CSS
    assert "Champion v1" in text and "Candidate v2" in text and "0.9883" in text
    assert page.locator("[data-testid=gates] .badge.live").count() == 5  # all five gates passed
    assert "same inputs" in page.content()
    page.screenshot(path=str(SCREENSHOTS / "3-evidence.png"), full_page=True)
    page.fill("#id_comment", "Recall up, signature unchanged.")
    page.click("[data-testid=approve]")
    page.wait_for_selector("[data-testid=approvals]:has-text('1 of 2')")
    assert page.locator("[data-testid=request-status]").inner_text() == "Awaiting review"
    assert not Deployment.objects.filter(request=req).exists()  # nothing deploys on one approval
    assert page.locator("[data-testid=approve]").count() == 0  # one person counts once
    _log_out(page)

    _log_in(page, live_server.url, second_reviewer.username)
    page.goto(f"{live_server.url}{req.get_absolute_url()}")
    page.click("[data-testid=approve]")
    page.locator("[data-testid=request-status]").filter(has_text=re.compile("^Live$")).wait_for(
        timeout=120_000
    )
    page.screenshot(path=str(SCREENSHOTS / "4-production-live.png"), full_page=True)
    req.refresh_from_db()
    assert req.status == DeploymentRequest.Status.LIVE
    assert Deployment.objects.get(request=req).traffic_weight == 100

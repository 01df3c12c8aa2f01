"""A person's path through the portal in Debian's chromium, driven by Playwright: the data
scientist requests version 2 and watches the real Celery worker run its gates, the reviewer
approves it, and the page shows it live once the worker has deployed it."""

from __future__ import annotations

import re

import pytest

from registry.services import registry_sync
from rollouts.models import Environment
from tests.browser.conftest import SCREENSHOTS
from tests.conftest import REGISTERED_MODEL
from tests.factories import PASSWORD

pytestmark = [
    pytest.mark.slow,
    pytest.mark.browser,
    # serialized_rollback: the flush after a transactional test must not lose migration data
    # (environments, role groups) that later tests rely on.
    pytest.mark.django_db(transaction=True, serialized_rollback=True),
]


def _log_in(page, base_url: str, username: str) -> None:
    page.goto(f"{base_url}/login/")
    page.fill("#id_username", username)
    page.fill("#id_password", PASSWORD)
    page.click("button[type=submit]")
    page.wait_for_selector("[data-testid=whoami]")


def _log_out(page) -> None:
    page.click("text=Log out")
    page.wait_for_selector("#id_username")


def test_data_scientist_requests_reviewer_approves_and_sees_it_live(
    live_server, real_worker, browser_page, data_scientist, reviewer
):
    registry_sync()
    page = browser_page

    _log_in(page, live_server.url, data_scientist.username)
    page.click("text=Models")
    page.click(f"text={REGISTERED_MODEL}")
    page.click("a[href$='/versions/2/']")
    page.click("[data-testid=request-deployment]")
    page.select_option("#id_environment", label="staging")
    page.fill("#id_justification", "Random forest beats the baseline on recall.")
    page.click("text=Send request")
    # The request opens with its gates pending; the page polls until the worker has run them.
    # (The worker may be quick enough that the first render already shows the outcome.)
    status = page.locator("[data-testid=request-status]")
    assert status.inner_text() in ("Pending gates", "Awaiting review")
    status.filter(has_text=re.compile("^Awaiting review$")).wait_for(timeout=120_000)
    page.reload()  # the polled fragment is the status alone; the evidence is on the page
    gates = page.locator("[data-testid=gates]")
    assert gates.locator(".badge.live").count() == len(
        Environment.objects.get(name="staging").gates
    )
    assert gates.locator(".badge.failed").count() == 0
    assert page.locator("[data-testid=approve]").count() == 0  # never for one's own request
    request_url = page.url
    page.screenshot(path=str(SCREENSHOTS / "1-requested.png"), full_page=True)
    _log_out(page)

    _log_in(page, live_server.url, reviewer.username)
    page.click("text=Requests")
    page.click(f"a[href='{request_url.removeprefix(live_server.url)}']")
    page.fill("#id_comment", "Checked the metrics; go.")
    page.click("[data-testid=approve]")
    status = page.locator("[data-testid=request-status]")
    status.filter(has_text=re.compile("^Live$")).wait_for(timeout=120_000)
    page.screenshot(path=str(SCREENSHOTS / "2-live.png"), full_page=True)
    assert "sha256:" in page.content()

    page.click("text=Endpoints")
    assert page.locator("text=v2 · 100%").count() == 1

"""Fixtures of the browser tests: Debian's chromium driven by Playwright."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "screenshots"


@pytest.fixture
def browser_page():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("ROLLGATE_REQUIRE_BROWSER"):
            pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package")
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls are
    # still synchronous, so tell Django not to refuse them.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(20_000)
        try:
            yield page
        finally:
            browser.close()
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


def log_served_rows(endpoint, model_version, sample) -> list:
    """Write one prediction-log row per row of ``sample`` (a DataFrame of real feature values)
    as if ``model_version`` had just served it on ``endpoint``, and mark the windows for the
    next rollup refresh. Returns the rows."""
    import json
    import uuid

    from django.utils import timezone

    from monitoring.rollups import mark_logged_rows
    from rollouts.models import PredictionLog

    now = timezone.now()
    rows = [
        PredictionLog(
            request_id=uuid.uuid4(),
            endpoint=endpoint,
            model_version=model_version,
            features=features,
            prediction=i % 2,
            latency_ms=4.0,
            created_at=now,
        )
        for i, features in enumerate(json.loads(sample.to_json(orient="records")))
    ]
    PredictionLog.objects.bulk_create(rows)
    mark_logged_rows(rows)
    return rows

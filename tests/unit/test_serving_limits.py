"""Per-key rate limits, per-endpoint body limits, /metrics, and routing changes reaching a
serving process without a restart."""

from __future__ import annotations

import json

import pytest

from registry.demo_models import breast_cancer_split
from rollouts.models import ApiKey, PredictionLog
from rollouts.services import api_key_create
from rollouts.serving.runtime import router


@pytest.fixture
def live(synced, deploy):
    v1, v2 = synced
    req = deploy(v1, "staging")
    key_row, key = api_key_create(name="limits", endpoints=[req.endpoint], created_by=None)
    row = breast_cancer_split().X_test.iloc[[0]]
    body = json.dumps({"dataframe_split": json.loads(row.to_json(orient="split", index=False))})
    return {"endpoint": req.endpoint, "key_row": key_row, "key": key, "body": body, "v2": v2}


def _post(client, live, body=None):
    return client.post(
        f"/serving/{live['endpoint'].name}/invocations",
        body or live["body"],
        content_type="application/json",
        headers={"Authorization": f"Bearer {live['key']}"},
    )


@pytest.fixture
def mid_minute(monkeypatch):
    """The counters' clock, held in the middle of a minute: no window ends during the test."""
    monkeypatch.setattr("portal.counters._clock", lambda: 1_800_000_030.0)


@pytest.mark.django_db
def test_a_key_over_its_rate_limit_gets_429_with_retry_after(client, live, mid_minute):
    ApiKey.objects.filter(pk=live["key_row"].pk).update(rate_limit_per_minute=3)
    statuses = [_post(client, live).status_code for _ in range(3)]
    refused = _post(client, live)
    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) == 30
    assert "3 requests per minute" in refused.json()["message"]
    assert PredictionLog.objects.count() == 3  # the refused request scored nothing


@pytest.mark.django_db
def test_an_endpoint_can_lower_its_own_body_limit(client, live):
    live["endpoint"].max_body_bytes = 100
    live["endpoint"].save(update_fields=["max_body_bytes"])
    router.invalidate()
    response = _post(client, live)
    assert response.status_code == 413
    assert "limit of 100 bytes" in response.json()["message"]


@pytest.mark.django_db
def test_metrics_count_requests_by_endpoint_version_and_status(client, live):
    assert _post(client, live).status_code == 200
    assert _post(client, live, body="{").status_code == 400
    text = client.get("/metrics").content.decode()
    name = live["endpoint"].name
    assert f'rollgate_serving_requests_total{{endpoint="{name}",status="200",version="1"}}' in text
    assert f'rollgate_serving_requests_total{{endpoint="{name}",status="400",version="1"}}' in text
    assert "rollgate_serving_batch_rows_count" in text
    assert "rollgate_serving_request_seconds_bucket" in text


@pytest.mark.django_db
def test_a_rollout_reaches_the_serving_process_without_a_restart(client, live, deploy, settings):
    assert _post(client, live)["X-Model-Version"] == "1"
    from rollouts.models import Environment

    Environment.objects.filter(name="staging").update(metric_tolerance=0.1)  # v2 scores lower
    deploy(live["v2"], "staging")
    settings.SERVING_ROUTE_TTL_S = 0.0  # the table a process caches expires (1 s by default)
    assert _post(client, live)["X-Model-Version"] == "2"


@pytest.mark.django_db
def test_the_rate_limit_holds_across_serving_processes(client, live, mid_minute):
    """Another process's calls count too: they are in the database, not in this process."""
    from portal.counters import window_hit

    ApiKey.objects.filter(pk=live["key_row"].pk).update(rate_limit_per_minute=3)
    for _ in range(2):  # two calls answered by another worker, this minute
        window_hit(f"api-key:{live['key_row'].pk}", length_s=60)
    assert _post(client, live).status_code == 200
    assert _post(client, live).status_code == 429

"""Ground truth over ``POST /api/feedback``, and the accuracy that the endpoint dashboard and the
metrics API derive from it (through the rollups, refreshed as Celery beat would)."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone
from sklearn.metrics import accuracy_score

from monitoring.models import GroundTruth
from monitoring.rollups import rollups_refresh, windows_mark_stale
from registry.models import ModelVersion, RegisteredModel
from rollouts import services
from rollouts.models import Endpoint, Environment, PredictionLog
from rollouts.serving.runtime import router

FEEDBACK = "/api/feedback"


# --- fixtures: a mirrored model, its endpoint and logged predictions (no MLflow needed) -----------


@pytest.fixture
def model(team):
    """Two versions of ``churn``, owned by ``team``."""
    now = timezone.now()
    registered = RegisteredModel.objects.create(name="churn", team=team, synced_at=now)
    v1 = ModelVersion.objects.create(
        registered_model=registered, version=1, status="READY", synced_at=now
    )
    v2 = ModelVersion.objects.create(
        registered_model=registered, version=2, status="READY", synced_at=now
    )
    return v1, v2


@pytest.fixture
def endpoint(model):
    return services.endpoint_for(
        model_version=model[0], environment=Environment.objects.get(name="staging")
    )


@pytest.fixture
def other_endpoint(model):
    return services.endpoint_for(
        model_version=model[0], environment=Environment.objects.get(name="production")
    )


@pytest.fixture
def api_key(endpoint, platform_admin):
    return services.api_key_create(name="web", endpoints=[endpoint], created_by=platform_admin)[1]


@pytest.fixture
def other_api_key(other_endpoint, platform_admin):
    return services.api_key_create(
        name="batch", endpoints=[other_endpoint], created_by=platform_admin
    )[1]


def _log(
    endpoint: Endpoint, mv: ModelVersion, predictions: list, *, minutes_ago: float = 0
) -> uuid.UUID:
    """One scoring request of ``len(predictions)`` rows; returns its request id."""
    request_id = uuid.uuid4()
    created = timezone.now() - timedelta(minutes=minutes_ago)
    PredictionLog.objects.bulk_create(
        PredictionLog(
            request_id=request_id,
            row_index=i,
            endpoint=endpoint,
            model_version=mv,
            features={"x": i},
            prediction=p,
            latency_ms=5.0 + i,
            created_at=created,
        )
        for i, p in enumerate(predictions)
    )
    return request_id


def _bearer(key: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {key}"}


def _post(client, payload, **headers):
    return client.post(FEEDBACK, payload, content_type="application/json", **headers)


def _labels() -> dict[tuple[str, int], object]:
    return {
        (str(gt.prediction.request_id), gt.prediction.row_index): gt.label
        for gt in GroundTruth.objects.select_related("prediction")
    }


# --- POST /api/feedback ---------------------------------------------------------------------------


def test_single_object(client, endpoint, model, api_key):
    rid = _log(endpoint, model[0], [1])
    response = _post(client, {"request_id": str(rid), "label": 1}, **_bearer(api_key))
    assert response.status_code == 200, response.content
    assert response.json() == {"accepted": 1, "pending": 0, "unknown": []}
    assert _labels() == {(str(rid), 0): 1}


def test_list_and_relabel(client, endpoint, model, api_key):
    a, b = _log(endpoint, model[0], [1]), _log(endpoint, model[0], ["cat"])
    response = _post(
        client,
        [{"request_id": str(a), "label": 0}, {"request_id": str(b), "label": "dog"}],
        **_bearer(api_key),
    )
    assert response.json() == {"accepted": 2, "pending": 0, "unknown": []}
    # A label sent again replaces the earlier one.
    assert (
        _post(client, {"request_id": str(a), "label": 1}, **_bearer(api_key)).json()["accepted"]
        == 1
    )
    assert _labels() == {(str(a), 0): 1, (str(b), 0): "dog"}
    assert GroundTruth.objects.count() == 2


def test_persona_may_send_labels(client, endpoint, model, reviewer, data_scientist):
    rid = _log(endpoint, model[0], [0])
    client.force_login(reviewer)
    response = _post(client, {"request_id": str(rid), "label": 0})
    assert response.status_code == 200
    assert _labels() == {(str(rid), 0): 0}
    client.force_login(data_scientist)  # of the team that owns the model
    assert _post(client, {"request_id": str(rid), "label": 1}).json()["accepted"] == 1
    assert _labels() == {(str(rid), 0): 1}


def test_another_teams_data_scientist_sees_ids_as_unknown(
    client, endpoint, model, other_data_scientist
):
    rid = _log(endpoint, model[0], [0])
    client.force_login(other_data_scientist)
    response = _post(client, {"request_id": str(rid), "label": 1})
    assert response.status_code == 200
    assert response.json() == {"accepted": 0, "pending": 1, "unknown": [str(rid)]}
    assert not GroundTruth.objects.exists()


def test_unknown_ids_are_reported_and_not_stored(client, endpoint, model, api_key):
    known = _log(endpoint, model[0], [1])
    missing = uuid.uuid4()
    response = _post(
        client,
        [{"request_id": str(missing), "label": 1}, {"request_id": str(known), "label": 0}],
        **_bearer(api_key),
    )
    assert response.status_code == 200
    assert response.json() == {"accepted": 1, "pending": 1, "unknown": [str(missing)]}
    assert _labels() == {(str(known), 0): 0}


def test_multi_row_request_needs_row_or_label_list(client, endpoint, model, api_key):
    single = _log(endpoint, model[0], [1])
    multi = _log(endpoint, model[0], [1, 0, 1])
    auth = _bearer(api_key)

    for bad in (
        {"request_id": str(multi), "label": 1},
        {"request_id": str(multi), "label": [1, 0]},
    ):
        response = _post(client, [{"request_id": str(single), "label": 1}, bad], **auth)
        assert response.status_code == 400
        assert "[1].label" in response.json()
    response = _post(client, {"request_id": str(multi), "label": 1, "row": 3}, **auth)
    assert response.status_code == 400
    assert "row" in str(response.json())
    assert not GroundTruth.objects.exists()  # nothing stored, not even the valid first item

    assert (
        _post(client, {"request_id": str(multi), "label": 0, "row": 1}, **auth).json()["accepted"]
        == 1
    )
    assert _labels() == {(str(multi), 1): 0}
    assert (
        _post(client, {"request_id": str(multi), "label": [0, 1, 0]}, **auth).json()["accepted"]
        == 3
    )
    assert _labels() == {(str(multi), 0): 0, (str(multi), 1): 1, (str(multi), 2): 0}


def test_api_key_of_another_endpoint_sees_ids_as_unknown(
    client, endpoint, model, api_key, other_api_key
):
    rid = _log(endpoint, model[0], [1])
    response = _post(client, {"request_id": str(rid), "label": 1}, **_bearer(other_api_key))
    assert response.status_code == 200
    assert response.json() == {"accepted": 0, "pending": 1, "unknown": [str(rid)]}
    assert not GroundTruth.objects.exists()


@pytest.mark.parametrize(
    "payload",
    [
        {"label": 1},
        {"request_id": "REQUEST"},
        {"request_id": "REQUEST", "label": None},
        {"request_id": "not-a-uuid", "label": 1},
        {"request_id": "REQUEST", "label": 1, "row": -1},
        [],
        [{"request_id": "REQUEST", "label": 1}, {"request_id": "nope", "label": 1}],
        "just a string",
    ],
    ids=[
        "no-id",
        "no-label",
        "null-label",
        "bad-uuid",
        "negative-row",
        "empty-list",
        "one-bad-item",
        "string",
    ],
)
def test_bad_input_is_400_and_stores_nothing(client, endpoint, model, api_key, payload):
    rid = str(_log(endpoint, model[0], [1]))

    def fill(value):
        if isinstance(value, dict):
            return {k: rid if v == "REQUEST" else v for k, v in value.items()}
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value

    response = _post(client, fill(payload), **_bearer(api_key))
    assert response.status_code == 400, response.content
    assert not GroundTruth.objects.exists()


def test_malformed_json_is_400(client, api_key):
    response = client.post(
        FEEDBACK, b"{not json", content_type="application/json", **_bearer(api_key)
    )
    assert response.status_code == 400


def test_feedback_needs_a_client_or_a_persona(client, endpoint, model, api_key, outsider):
    rid = str(_log(endpoint, model[0], [1]))
    payload = {"request_id": rid, "label": 1}
    response = _post(client, payload)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == "Bearer"
    assert _post(client, payload, **_bearer("rg_not-a-key")).status_code == 401
    client.force_login(outsider)
    assert _post(client, payload).status_code == 403
    assert not GroundTruth.objects.exists()


def test_revoked_key_is_refused(client, endpoint, model, api_key, platform_admin):
    from rollouts.models import ApiKey

    services.api_key_revoke(key_id=ApiKey.objects.get(name="web").pk, actor=platform_admin)
    rid = str(_log(endpoint, model[0], [1]))
    assert _post(client, {"request_id": rid, "label": 1}, **_bearer(api_key)).status_code == 401
    assert not GroundTruth.objects.exists()


# --- accuracy on the dashboard and the metrics API ------------------------------------------------


def _refresh() -> None:
    """What the log writer and Celery beat do: mark the logged hours stale, roll them up."""
    windows_mark_stale(
        PredictionLog.objects.values_list("endpoint_id", "model_version_id", "created_at")
    )
    rollups_refresh(with_drift=False)


def _dashboard_accuracy(client, endpoint) -> dict[int, str]:
    _refresh()
    response = client.get(f"/monitoring/endpoints/{endpoint.name}/")
    assert response.status_code == 200
    html = response.content.decode()
    rows = re.findall(r'<tr data-version="(\d+)"[^>]*>(.*?)</tr>', html, flags=re.S)
    return {
        int(version): re.search(r'data-accuracy="([^"]*)">(.*?)</td>', body, flags=re.S).groups()
        for version, body in rows
    }


def _metrics(client, endpoint) -> dict[int, dict]:
    _refresh()
    response = client.get(f"/api/endpoints/{endpoint.name}/metrics")
    assert response.status_code == 200
    return {row["version"]: row for row in response.json()}


def test_accuracy_is_undefined_without_labels(client, endpoint, model, manager):
    _log(endpoint, model[0], [1, 0])
    client.force_login(manager)
    value, shown = _dashboard_accuracy(client, endpoint)[1]
    assert value == ""
    assert "undefined" in shown
    row = _metrics(client, endpoint)[1]
    assert (row["rows"], row["labeled"], row["accuracy"], row["label_coverage"]) == (
        2,
        0,
        None,
        0.0,
    )


def test_accuracy_matches_sklearn_on_labeled_rows(client, endpoint, model, api_key, manager):
    v1, v2 = model
    # v1: 7 rows, 6 labeled (4 right); v2: 3 rows, 2 labeled (1 right), one of them 1 vs 1.0.
    v1_predictions = [[1, 0, 1], [1], [0], [1], [0]]  # 5 requests, 7 rows
    v1_labels = [[1, 1, 1], [1], [0], None, [1]]
    v2_predictions = [[1], [0, 0]]
    v2_labels = [[1.0], [1, None]]

    truth: dict[int, tuple[list, list]] = {1: ([], []), 2: ([], [])}
    items = []
    for version, mv, predictions, labels in (
        (1, v1, v1_predictions, v1_labels),
        (2, v2, v2_predictions, v2_labels),
    ):
        for i, (preds, labs) in enumerate(zip(predictions, labels, strict=True)):
            rid = str(_log(endpoint, mv, preds, minutes_ago=30 - i))
            if labs is None:
                continue
            for row, (p, y) in enumerate(zip(preds, labs, strict=True)):
                if y is None:
                    continue
                items.append({"request_id": rid, "label": y, "row": row})
                truth[version][0].append(y)
                truth[version][1].append(p)
    assert _post(client, items, **_bearer(api_key)).json() == {
        "accepted": len(items),
        "pending": 0,
        "unknown": [],
    }

    expected = {v: accuracy_score(*truth[v]) for v in (1, 2)}
    assert expected == {1: pytest.approx(4 / 6), 2: 0.5}

    client.force_login(manager)
    shown = _dashboard_accuracy(client, endpoint)
    metrics = _metrics(client, endpoint)
    for version in (1, 2):
        assert float(shown[version][0]) == pytest.approx(expected[version])
        assert f"{expected[version]:.4f}" in shown[version][1]
        assert metrics[version]["accuracy"] == pytest.approx(expected[version])
    assert (metrics[1]["requests"], metrics[1]["rows"], metrics[1]["labeled"]) == (5, 7, 6)
    assert (metrics[2]["requests"], metrics[2]["rows"], metrics[2]["labeled"]) == (2, 3, 2)


def test_metrics_of_unknown_endpoint_is_404(client, manager):
    client.force_login(manager)
    assert client.get("/api/endpoints/nope/metrics").status_code == 404


def test_dashboard_and_metrics_are_for_the_owning_team(
    client, endpoint, model, data_scientist, other_data_scientist, reviewer, outsider
):
    _log(endpoint, model[0], [1])
    for user in (data_scientist, reviewer):
        client.force_login(user)
        assert _dashboard_accuracy(client, endpoint)[1][0] == ""
        assert _metrics(client, endpoint)[1]["rows"] == 1
    # Another team's data scientist, or a user without a role: no such endpoint.
    for user in (other_data_scientist, outsider):
        client.force_login(user)
        assert client.get(f"/monitoring/endpoints/{endpoint.name}/").status_code == 404
        assert client.get(f"/api/endpoints/{endpoint.name}/metrics").status_code == 404


def test_dashboard_windows_render(client, endpoint, model, manager):
    _log(endpoint, model[0], [1], minutes_ago=60 * 24 * 10)
    _log(endpoint, model[1], [0])
    _refresh()
    client.force_login(manager)
    url = f"/monitoring/endpoints/{endpoint.name}/"
    # Ten days of data: day windows by default.
    assert client.get(url).context["range"].window == "day"
    for window in ("hour", "day"):
        response = client.get(url, {"window": window})
        assert response.status_code == 200
        assert response.context["range"].window == window
    # Only hour and day windows are rolled up: anything else is refused with the reason.
    for window in ("minute", "bogus"):
        response = client.get(url, {"window": window})
        assert response.status_code == 400
        assert b"window must be one of hour, day" in response.content


# --- end to end: serve, label, measure ------------------------------------------------------------


def test_served_predictions_take_labels(client, deploy, manager, platform_admin, synced):
    v1, _ = synced
    req = deploy(v1, "staging", justification="serve it")
    assert req.status == "live", req.status_reason
    _, key = services.api_key_create(
        name="web", endpoints=[req.endpoint], created_by=platform_admin
    )
    router.invalidate()

    response = client.post(
        f"/serving/{req.endpoint.name}/invocations",
        v1.input_example,
        content_type="application/json",
        **_bearer(key),
    )
    assert response.status_code == 200, response.content
    predictions = response.json()["predictions"]
    rid = response["X-Request-Id"]
    assert len(predictions) == 3
    assert PredictionLog.objects.filter(request_id=rid).count() == 3

    labels = [1 - predictions[0], predictions[1], predictions[2]]
    assert _post(client, {"request_id": rid, "label": labels}, **_bearer(key)).json() == {
        "accepted": 3,
        "pending": 0,
        "unknown": [],
    }
    client.force_login(manager)
    row = _metrics(client, req.endpoint)[1]
    assert row["accuracy"] == pytest.approx(accuracy_score(labels, predictions))
    assert (row["requests"], row["rows"], row["labeled"]) == (1, 3, 3)

"""``rollups_rebuild`` (the set-based backfill of hour and day rollups) equals the hour-by-hour
Python path (``compute_hour`` / ``refresh_window``) on the same log. On PostgreSQL (CI) this
compares the SQL path with Python; on SQLite the rebuild falls back to Python."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection

from monitoring import metrics
from monitoring.models import GroundTruth, Rollup, StaleWindow
from monitoring.rollups import (
    HOUR,
    compute_hour,
    floor_day,
    refresh_window,
    rollups_rebuild,
    windows_mark_stale,
)
from registry.models import ModelVersion, RegisteredModel
from rollouts import services
from rollouts.models import Environment, PredictionLog, ServingError

START = datetime(2025, 3, 1, 21, 0, tzinfo=UTC)  # three hours cross midnight
HOURS = 5
NAN, INF = float("nan"), float("inf")


@pytest.fixture
def logged(team):
    """Two classifier versions and a regressor's log on one endpoint each, with labels of every
    kind ``label_key`` reads (ints, floats, bools, strings, lists), scores with gaps, latencies on
    bucket bounds and non-finite ones, multi-row requests and serving errors."""
    now = datetime.now(UTC)
    registered = RegisteredModel.objects.create(name="churn", team=team, synced_at=now)
    v1, v2 = (
        ModelVersion.objects.create(
            registered_model=registered, version=n, status="READY", synced_at=now
        )
        for n in (1, 2)
    )
    regressor_model = RegisteredModel.objects.create(name="price", team=team, synced_at=now)
    regressor = ModelVersion.objects.create(
        registered_model=regressor_model,
        version=1,
        status="READY",
        synced_at=now,
        signature={"inputs": [], "outputs": [{"type": "double"}]},
    )
    staging = Environment.objects.get(name="staging")
    endpoint = services.endpoint_for(model_version=v1, environment=staging)
    price = services.endpoint_for(model_version=regressor, environment=staging)
    rng = random.Random(7)
    # SQLite stores NaN as NULL: NaN latencies and scores only where the database keeps them.
    nan = NAN if connection.vendor == "postgresql" else 4.2
    bounds = metrics.LATENCY_BOUNDS_MS
    labels = [0, 1, 1, 1.0, True, False, "1", "true", "0", [1], 2]
    latencies = [float(bounds[10]), float(bounds[11]), 0.0, 0.05, 1e9, nan, INF, 3.7, 12.5]
    rows, truths = [], []
    for version, ep, regression in (
        (v1, endpoint, False),
        (v2, endpoint, False),
        (regressor, price, True),
    ):
        for i in range(400):
            created = START + timedelta(seconds=rng.uniform(0, HOURS * 3600))
            request_id = uuid.uuid4()
            for row_index in range(rng.choice([1, 1, 1, 2, 3])):
                if regression:
                    prediction = rng.choice([rng.uniform(0, 10), 3, "n/a", True])
                else:
                    prediction = rng.choice([0, 1, 1, True, "1", 2])
                score = rng.choice([None, nan, 0.0, 1.0, 0.0005, 0.999, 1.5, -0.2, rng.random()])
                rows.append(
                    PredictionLog(
                        request_id=request_id,
                        row_index=row_index,
                        endpoint=ep,
                        model_version=version,
                        features={"x": i},
                        prediction=prediction,
                        score=score,
                        latency_ms=rng.choice(latencies)
                        if rng.random() < 0.3
                        else rng.lognormvariate(2.5, 1),
                        created_at=created,
                    )
                )
            if rng.random() < 0.05:
                ServingError.objects.create(
                    request_id=uuid.uuid4(),
                    endpoint=ep,
                    model_version=version,
                    status_code=422,
                    error_code="invalid_input",
                    created_at=created,
                )
    PredictionLog.objects.bulk_create(rows)
    for row in rows:
        if rng.random() < 0.6:
            if row.model_version_id == regressor.pk:
                label = rng.choice([rng.uniform(0, 10), 4, {"y": 1}, "x", False])
            else:
                label = rng.choice(labels)
            truths.append(GroundTruth(prediction=row, label=label, received_at=row.created_at))
    GroundTruth.objects.bulk_create(truths)
    # An hour with an error only, and a stale hour rollup that the rebuild must delete.
    ServingError.objects.create(
        request_id=uuid.uuid4(),
        endpoint=endpoint,
        model_version=v2,
        status_code=500,
        error_code="model_error",
        created_at=START + timedelta(hours=HOURS, minutes=5),
    )
    return {"endpoints": (endpoint, price), "versions": (v1, v2, regressor)}


FIELDS = (
    "requests",
    "rows",
    "errors",
    "latency_hist",
    "labeled",
    "task",
    "confusion",
    "score_pos_hist",
    "score_neg_hist",
)


def _rollups(endpoint, granularity):
    return {
        (r.model_version_id, r.window_start): r
        for r in Rollup.objects.filter(endpoint=endpoint, granularity=granularity)
    }


def _assert_same(python, rebuilt):
    assert python.keys() == rebuilt.keys()
    for key, expected in python.items():
        got = rebuilt[key]
        for name in FIELDS:
            assert getattr(got, name) == getattr(expected, name), (key, name)
        for name in ("squared_error_sum", "absolute_error_sum"):
            assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-9), (
                key,
                name,
            )


@pytest.mark.django_db
def test_rebuild_equals_the_hour_by_hour_python_path(logged):
    end = START + timedelta(hours=HOURS + 1)
    for endpoint in logged["endpoints"]:
        keys = set()
        for model in (PredictionLog, ServingError):
            keys |= {
                (e, v, t)
                for e, v, t in model.objects.filter(endpoint=endpoint).values_list(
                    "endpoint_id", "model_version_id", "created_at"
                )
            }
        windows_mark_stale(keys)
        hours = set(
            StaleWindow.objects.filter(endpoint=endpoint).values_list("model_version_id", "hour")
        )
        assert len(hours) >= HOURS
        for version_id, hour in hours:
            refresh_window(endpoint.pk, ModelVersion.objects.get(pk=version_id), hour)
        python_hours, python_days = _rollups(endpoint, "hour"), _rollups(endpoint, "day")
        assert (
            any(r.score_pos_hist for r in python_hours.values())
            or endpoint == logged["endpoints"][1]
        )
        # A leftover hour rollup of the range with no rows must go away.
        leftover = Rollup.objects.create(
            endpoint=endpoint,
            model_version=logged["versions"][0]
            if endpoint == logged["endpoints"][0]
            else logged["versions"][2],
            granularity="hour",
            window_start=START - HOUR,
            requests=3,
            rows=3,
            computed_at=START,
        )
        Rollup.objects.filter(endpoint=endpoint).exclude(pk=leftover.pk).delete()

        result = rollups_rebuild(endpoint.pk, START - HOUR, end)

        assert not Rollup.objects.filter(pk=leftover.pk).exists()
        _assert_same(python_hours, _rollups(endpoint, "hour"))
        _assert_same(python_days, _rollups(endpoint, "day"))
        assert result.hours == len(python_hours)
        assert not StaleWindow.objects.filter(endpoint=endpoint).exists()


@pytest.mark.django_db
def test_rebuild_of_one_hour_matches_compute_hour_and_keeps_other_hours(logged):
    endpoint = logged["endpoints"][0]
    v1 = logged["versions"][0]
    rollups_rebuild(endpoint.pk, START, START + timedelta(hours=HOURS + 1))
    before = _rollups(endpoint, "hour")
    hour = START + HOUR
    rollups_rebuild(endpoint.pk, hour, hour + timedelta(minutes=30))  # rounds out to the hour
    after = _rollups(endpoint, "hour")
    assert after.keys() == before.keys()
    expected = compute_hour(endpoint.pk, v1, hour)
    got = after[(v1.pk, hour)]
    for name in FIELDS:
        assert getattr(got, name) == expected[name], name
    day = _rollups(endpoint, "day")[(v1.pk, floor_day(hour))]
    assert day.rows == sum(
        r.rows for (v, t), r in after.items() if v == v1.pk and floor_day(t) == floor_day(hour)
    )

"""The endpoint dashboard, the drift histogram endpoint, the manager overview and the metrics
API, on rollups written directly: figures per version and window, undefined values, scoping,
strict JSON, delivery figures, and a bounded number of SQL queries that never touch the raw
prediction log."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timedelta

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from monitoring import metrics, selectors
from monitoring.figures import strict
from monitoring.models import DriftRollup, Rollup
from monitoring.rollups import drift_summary, floor_day, floor_hour
from registry.models import ModelVersion, RegisteredModel
from rollouts import services
from rollouts.models import Deployment, DeploymentRequest, Environment

FEATURES = ["age", "income", "plan"]


# --- builders ---------------------------------------------------------------------------------


@pytest.fixture
def versions(team):
    now = timezone.now()
    registered = RegisteredModel.objects.create(name="churn", team=team, synced_at=now)
    return [
        ModelVersion.objects.create(
            registered_model=registered, version=n, status="READY", synced_at=now
        )
        for n in (1, 2, 3)
    ]


@pytest.fixture
def endpoint(versions):
    return services.endpoint_for(
        model_version=versions[0], environment=Environment.objects.get(name="staging")
    )


def _deployment(endpoint, version, requester, *, weight, status="live", role="stable", **times):
    """A request and its deployment with the given times (``requested``, ``live``, ``retired``,
    ``started``) and request status."""
    requested = times.get("requested", timezone.now() - timedelta(days=2))
    req = DeploymentRequest.objects.create(
        model_version=version,
        endpoint=endpoint,
        justification="test",
        requester=requester,
        status=times.get("request_status", "live"),
        live_at=times.get("live"),
    )
    DeploymentRequest.objects.filter(pk=req.pk).update(created_at=requested)
    dep = Deployment.objects.create(
        endpoint=endpoint,
        model_version=version,
        request=req,
        status=status,
        role=role,
        traffic_weight=weight,
        live_at=times.get("live", requested + timedelta(hours=1)),
        retired_at=times.get("retired"),
    )
    Deployment.objects.filter(pk=dep.pk).update(started_at=times.get("started", requested))
    return dep


@pytest.fixture
def stable_and_canary(endpoint, versions, data_scientist):
    """v1 stable at 90 %, v2 canary at 10 %."""
    _deployment(endpoint, versions[0], data_scientist, weight=90)
    _deployment(endpoint, versions[1], data_scientist, weight=10, role="canary")


def _rollup(endpoint, version, granularity, start, *, requests, errors=0, latency_ms=10.0,
            confusion=None, rows=None, scores=None):  # fmt: skip
    confusion = confusion or {}
    labeled = sum(sum(r.values()) for r in confusion.values())
    pos = neg = []
    if scores is not None:
        pos, neg = metrics.score_histograms(*scores)
    return Rollup(
        endpoint=endpoint,
        model_version=version,
        granularity=granularity,
        window_start=start,
        requests=requests,
        rows=rows if rows is not None else requests,
        errors=errors,
        latency_hist=metrics.latency_histogram([latency_ms] * requests),
        labeled=labeled,
        task="classification",
        confusion=confusion,
        score_pos_hist=pos,
        score_neg_hist=neg,
        computed_at=timezone.now(),
    )


def _feature(name, status, psi=None, reason=""):
    return {"name": name, "kind": "numeric", "status": status, "reason": reason, "psi": psi}


def _drift(endpoint, version, granularity, start, statuses, *, histograms=None):
    features = [_feature(n, s, 0.3 if s == "drift" else 0.01) for n, s in statuses.items()]
    n_drifted = sum(s == "drift" for s in statuses.values())
    evaluated = sum(s != "insufficient data" for s in statuses.values())
    share = n_drifted / evaluated if evaluated else None
    result = {
        "drifted": share is not None and share >= 0.5,
        "share_drifted": share,
        "n_evaluated": evaluated,
        "n_drifted": n_drifted,
        "reason": "",
        "features": features,
        "prediction": _feature("prediction", "ok", 0.02),
    }
    return DriftRollup(
        endpoint=endpoint,
        model_version=version,
        granularity=granularity,
        window_start=start,
        rows=100,
        reference="training sample",
        drifted=None if share is None else share >= 0.5,
        share_drifted=share,
        result=result,
        summary=drift_summary(result),
        histograms=histograms
        if histograms is not None
        else {
            n: {
                "kind": "numeric",
                "edges": [0.0, 1.0, 2.0, 3.0],
                "reference": [0.2, 0.5, 0.3],
                "current": [0.1, 0.3, 0.6],
            }
            for n in [*statuses, "prediction"]
        },
        computed_at=timezone.now(),
    )


def _fill(endpoint, versions, days: int, now: datetime, *, skip: int = 0) -> None:
    """Day rollups and drift rollups for days ``skip`` to ``days - 1`` before today, and (when
    ``skip`` is 0) 48 hours of hour rollups, per version."""
    rollups, drifts = [], []
    today = floor_day(now)
    for version in versions:
        for d in range(skip, days):
            start = today - timedelta(days=d)
            rollups.append(
                _rollup(endpoint, version, "day", start, requests=100, confusion={"1": {"1": 5}})
            )
            drifts.append(_drift(endpoint, version, "day", start, dict.fromkeys(FEATURES, "ok")))
        for h in range(48 if skip == 0 else 0):
            start = floor_hour(now) - timedelta(hours=h)
            rollups.append(_rollup(endpoint, version, "hour", start, requests=4))
            drifts.append(_drift(endpoint, version, "hour", start, dict.fromkeys(FEATURES, "ok")))
    Rollup.objects.bulk_create(rollups)
    DriftRollup.objects.bulk_create(drifts)


def _embedded(html: str, element_id: str):
    """The JSON of a ``json_script`` block, parsed strictly (NaN or Infinity raise)."""
    match = re.search(
        rf'<script id="{element_id}" type="application/json">(.*?)</script>', html, flags=re.S
    )
    assert match, f"no {element_id} block"

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(match.group(1), parse_constant=refuse)


def _url(endpoint) -> str:
    return f"/monitoring/endpoints/{endpoint.name}/"


# --- figures ------------------------------------------------------------------------------------


def test_figures_per_version_and_window(client, endpoint, versions, stable_and_canary, manager):
    v1, v2, _ = versions
    now = timezone.now()
    h0, h1 = floor_hour(now) - timedelta(hours=2), floor_hour(now) - timedelta(hours=1)
    Rollup.objects.bulk_create(
        [
            # v1: 8 of 10 labeled in h0 (6 right), 5 of 10 labeled in h1 (5 right); one error.
            _rollup(
                endpoint,
                v1,
                "hour",
                h0,
                requests=10,
                errors=1,
                confusion={"1": {"1": 3, "0": 2}, "0": {"0": 3}},
            ),
            _rollup(endpoint, v1, "hour", h1, requests=10, confusion={"1": {"1": 5}}),
            # v2 (canary): traffic but no labels yet.
            _rollup(endpoint, v2, "hour", h1, requests=10, latency_ms=40.0),
        ]
    )
    client.force_login(manager)
    response = client.get(_url(endpoint), {"window": "hour", "days": 1})
    assert response.status_code == 200
    table = {v.version: v for v in response.context["versions"]}
    assert [v.version for v in response.context["versions"]] == [1, 2]
    assert (table[1].role, table[1].traffic_weight) == ("stable", 90)
    assert (table[2].role, table[2].traffic_weight) == ("canary", 10)
    assert table[1].accuracy == pytest.approx(11 / 13)
    assert table[1].label_coverage == pytest.approx(13 / 20)
    assert table[1].error_rate == pytest.approx(1 / 21)
    assert table[1].recall == pytest.approx(8 / 10)  # positive class "1"
    assert table[1].confusion_labels == ["0", "1"]
    assert table[1].confusion_matrix == [[3, 0], [2, 8]]
    assert table[2].accuracy is None and table[2].label_coverage == 0.0
    assert table[2].latency_p50_ms == pytest.approx(40.0, rel=0.1)

    html = response.content.decode()
    row = re.search(r'<tr data-version="2"[^>]*>(.*?)</tr>', html, flags=re.S).group(1)
    assert "undefined (no labeled predictions yet)" in row
    assert re.search(r'data-accuracy="">', row)
    row = re.search(r'<tr data-version="1"[^>]*>(.*?)</tr>', html, flags=re.S).group(1)
    assert f"{11 / 13:.4f}" in row and "65.0%" in row  # coverage beside accuracy

    figures = _embedded(html, "figures")
    traces = {t["name"]: t for t in figures["quality"]["data"]}
    assert traces["v1 (stable) accuracy"]["y"] == pytest.approx([6 / 8, 1.0])
    assert traces["v1 (stable) label coverage"]["y"] == pytest.approx([0.8, 0.5])
    assert traces["v2 (canary) accuracy"]["y"] == [None]  # a gap, not 0
    assert traces["v2 (canary) label coverage"]["y"] == [0.0]
    share = {t["name"]: t["y"] for t in figures["traffic"]["data"]}
    assert share == {"v1 (stable)": [1.0, 0.5], "v2 (canary)": [0.5]}
    errors = {t["name"]: t["y"] for t in figures["errors"]["data"]}
    assert errors["v1 (stable)"] == pytest.approx([1 / 11, 0.0])
    assert {t["name"] for t in figures["latency"]["data"]} >= {
        "v1 (stable) p50",
        "v1 (stable) p95",
        "v1 (stable) p99",
    }


def test_roc_auc_from_score_histograms(client, endpoint, versions, manager):
    v1 = versions[0]
    scores = [0.9, 0.8, 0.3, 0.2, 0.6]
    positive = [True, True, False, False, False]
    _rollup(
        endpoint,
        v1,
        "day",
        floor_day(timezone.now()),
        requests=5,
        confusion={"1": {"1": 2}, "0": {"0": 2, "1": 1}},
        scores=(scores, positive),
    ).save()
    from sklearn.metrics import roc_auc_score

    client.force_login(manager)
    response = client.get(_url(endpoint), {"window": "day"})
    (v,) = response.context["versions"]
    assert v.role == "not live"
    assert v.roc_auc == pytest.approx(roc_auc_score(positive, scores))


def test_hour_windows_take_roc_auc_from_the_hours_of_the_range(client, endpoint, versions, manager):
    """Hour pages read score histograms from the first day's hours and the later days' day
    rollups; the figure equals the one over every hour in the range."""
    v1 = versions[0]
    now = timezone.now()
    rng = np.random.default_rng(4)
    labels = {"1": {"1": 4}, "0": {"0": 4}}
    rollups, all_scores, all_positive = [], [], []
    by_day: dict = {}
    for h in range(90):  # more hours than the 3-day range holds, over 4 or 5 calendar days
        start = floor_hour(now) - timedelta(hours=h)
        positive = [bool(x) for x in rng.integers(0, 2, 8)]
        scores = [float(x) for x in rng.random(8)]
        all_scores += scores
        all_positive += positive
        rollups.append(
            _rollup(
                endpoint, v1, "hour", start, requests=8, confusion=labels, scores=(scores, positive)
            )
        )
        day = by_day.setdefault(floor_day(start), ([], []))
        day[0].extend(scores)
        day[1].extend(positive)
    for day, (scores, positive) in by_day.items():
        rollups.append(
            _rollup(endpoint, v1, "day", day, requests=len(scores), scores=(scores, positive))
        )
    Rollup.objects.bulk_create(rollups)
    client.force_login(manager)

    response = client.get(_url(endpoint), {"window": "hour", "days": 3})
    hours, start = response.context["versions"][0], response.context["range"].start
    in_range = [floor_hour(now) - timedelta(hours=h) >= start for h in range(90)]
    assert 0 < sum(in_range) < 90
    pos, neg = metrics.score_histograms(
        [
            s
            for s, keep in zip(all_scores, [k for k in in_range for _ in range(8)], strict=True)
            if keep
        ],
        [
            p
            for p, keep in zip(all_positive, [k for k in in_range for _ in range(8)], strict=True)
            if keep
        ],
    )
    assert hours.roc_auc == pytest.approx(metrics.roc_auc_from_histograms(pos, neg), abs=1e-12)


def test_default_window_and_bad_ranges(client, endpoint, versions, manager):
    client.force_login(manager)
    url = _url(endpoint)
    # No data: hours; a long requested range: days.
    assert client.get(url).context["range"].window == "hour"
    assert client.get(url, {"days": 30}).context["range"].window == "day"
    assert client.get(url, {"days": 2}).context["range"].window == "hour"
    _fill(endpoint, versions[:1], days=10, now=timezone.now())
    response = client.get(url)
    assert (response.context["range"].window, response.context["range"].days) == ("day", 90)
    assert client.get(url, {"window": "hour"}).context["range"].days == 7
    for params, message in (
        ({"window": "week"}, b"window must be one of hour, day"),
        ({"days": "ten"}, b"days must be a whole number"),
        ({"days": 0}, b"at least 1"),
        ({"window": "hour", "days": 60}, b"choose window=day"),
        ({"window": "day", "days": 5000}, b"At most 731 days"),
    ):
        response = client.get(url, params)
        assert response.status_code == 400, params
        assert message in response.content
    response = client.get(f"/api/endpoints/{endpoint.name}/metrics", {"window": "week"})
    assert response.status_code == 400


# --- drift --------------------------------------------------------------------------------------


def test_drift_heatmap_and_histogram_endpoint(client, endpoint, versions, manager):
    v1 = versions[0]
    day = floor_day(timezone.now())
    old = _drift(endpoint, v1, "day", day - timedelta(days=1), dict.fromkeys(FEATURES, "ok"))
    new = _drift(
        endpoint,
        v1,
        "day",
        day,
        {"age": "drift", "income": "insufficient data", "plan": "warning"},
        histograms={},
    )
    new.result["features"][1]["reason"] = "the current window has no usable values"
    new.summary = drift_summary(new.result)
    DriftRollup.objects.bulk_create([old, new])
    old, new = DriftRollup.objects.order_by("window_start")
    client.force_login(manager)
    response = client.get(_url(endpoint), {"window": "day", "feature": "age"})
    html = response.content.decode()
    (heatmap,) = _embedded(html, "drift-heatmaps")
    trace = heatmap["data"][0]
    assert trace["y"] == [*FEATURES, "prediction"]
    assert trace["z"] == [[0, 2], [0, None], [0, 1], [0, 0]]  # insufficient data: a gap
    assert trace["customdata"][1] == [old.pk, new.pk]
    assert "the current window has no usable values" in trace["text"][1][1]
    assert "Dataset and prediction drift per window" in html

    # ?feature= opens the latest window in which the feature drifted.
    initial = _embedded(html, "drift-initial")
    assert initial["url"] == f"/monitoring/endpoints/{endpoint.name}/drift/{new.pk}/age.json"

    # That window kept no histograms: 404; the day before has them.
    assert client.get(initial["url"]).status_code == 404
    response = client.get(f"/monitoring/endpoints/{endpoint.name}/drift/{old.pk}/income.json")
    assert response.status_code == 200
    body = json.loads(response.content, parse_constant=_refuse)
    assert body["feature"] == "income" and body["version"] == 1
    assert [t["name"] for t in body["figure"]["data"]] == ["reference", "current"]
    assert body["figure"]["data"][1]["y"] == [0.1, 0.3, 0.6]
    assert body["figure"]["data"][0]["x"] == [0.5, 1.5, 2.5]
    assert "ok" in body["summary"]
    # Unknown feature or rollup: 404.
    assert (
        client.get(f"/monitoring/endpoints/{endpoint.name}/drift/{old.pk}/nope.json").status_code
        == 404
    )
    assert (
        client.get(f"/monitoring/endpoints/{endpoint.name}/drift/999999/age.json").status_code
        == 404
    )
    # A feature name with a space travels percent-encoded.
    spaced = _drift(endpoint, v1, "hour", floor_hour(timezone.now()), {"mean radius": "ok"})
    spaced.save()
    response = client.get(
        f"/monitoring/endpoints/{endpoint.name}/drift/{spaced.pk}/mean%20radius.json"
    )
    assert response.status_code == 200


def _refuse(constant):
    raise ValueError(f"{constant} is not JSON")


def test_unknown_feature_says_so(client, endpoint, versions, manager):
    _drift(endpoint, versions[0], "day", floor_day(timezone.now()), {"age": "ok"}).save()
    client.force_login(manager)
    response = client.get(_url(endpoint), {"window": "day", "feature": "nope"})
    assert response.status_code == 200
    assert _embedded(response.content.decode(), "drift-initial") is None
    assert "No drift result for feature “nope”" in response.content.decode()


def test_strict_replaces_non_finite_numbers():
    value = strict({"a": [1.0, math.nan, math.inf, -math.inf], "b": {"c": math.nan}})
    assert value == {"a": [1.0, None, None, None], "b": {"c": None}}
    json.dumps(value, allow_nan=False)


def test_nan_and_infinity_reach_the_browser_as_null(
    client, endpoint, versions, manager, monkeypatch
):
    """Both databases refuse NaN in JSON columns, but figures computed from the rollups may
    still be NaN or infinite (a bad histogram, a division): the page and the histogram
    endpoint send them as null, in JSON that a strict parser accepts."""
    v1 = versions[0]
    day = floor_day(timezone.now())
    _rollup(endpoint, v1, "day", day, requests=3, confusion={"1": {"1": 1}}).save()
    drift = _drift(endpoint, v1, "day", day, {"age": "drift"})
    drift.save()
    monkeypatch.setattr(selectors.metrics, "latency_percentile", lambda hist, q: math.nan)
    real_histogram = selectors.drift_histogram

    def with_infinities(*args):
        detail = real_histogram(*args)
        detail["histogram"]["edges"][-1] = math.inf
        detail["histogram"]["current"][0] = math.nan
        detail["drift"]["psi"] = -math.inf
        return detail

    monkeypatch.setattr(selectors, "drift_histogram", with_infinities)
    client.force_login(manager)
    response = client.get(_url(endpoint), {"window": "day", "feature": "age"})
    html = response.content.decode()
    for block in ("figures", "drift-heatmaps", "drift-initial"):
        _embedded(html, block)  # parses strictly
    latency = _embedded(html, "figures")["latency"]["data"][0]
    assert latency["y"] == [None]
    response = client.get(f"/monitoring/endpoints/{endpoint.name}/drift/{drift.pk}/age.json")
    assert response.status_code == 200
    body = json.loads(response.content, parse_constant=_refuse)
    assert body["figure"]["data"][1]["y"][0] is None
    assert body["figure"]["data"][0]["x"][-1] is None
    assert body["drift"]["psi"] is None
    api = client.get(f"/api/endpoints/{endpoint.name}/metrics", {"window": "day"})
    assert json.loads(api.content, parse_constant=_refuse)[0]["latency_p50_ms"] is None


# --- scoping ----------------------------------------------------------------------------------


def test_another_teams_endpoint_is_404(client, endpoint, versions, other_data_scientist, outsider):
    drift = _drift(endpoint, versions[0], "day", floor_day(timezone.now()), {"age": "drift"})
    drift.save()
    for user in (other_data_scientist, outsider):
        client.force_login(user)
        assert client.get(_url(endpoint)).status_code == 404
        assert client.get(f"{_url(endpoint)}drift/{drift.pk}/age.json").status_code == 404
        assert client.get(f"/api/endpoints/{endpoint.name}/metrics").status_code == 404
        response = client.get("/")
        assert response.status_code == 200
        assert endpoint.name not in response.content.decode()


def test_rollup_of_another_endpoint_is_404(client, endpoint, versions, manager):
    other = services.endpoint_for(
        model_version=versions[0], environment=Environment.objects.get(name="production")
    )
    drift = _drift(other, versions[0], "day", floor_day(timezone.now()), {"age": "drift"})
    drift.save()
    client.force_login(manager)
    assert client.get(f"{_url(endpoint)}drift/{drift.pk}/age.json").status_code == 404
    assert client.get(f"{_url(other)}drift/{drift.pk}/age.json").status_code == 200


# --- the manager overview ---------------------------------------------------------------------


def test_overview_health_drift_links_and_approvals(
    client, endpoint, versions, stable_and_canary, manager, data_scientist
):
    v1, v2, v3 = versions
    now = timezone.now()
    Rollup.objects.bulk_create(
        [
            _rollup(endpoint, v1, "hour", floor_hour(now), requests=90, errors=10, latency_ms=20),
            _rollup(endpoint, v2, "hour", floor_hour(now) - timedelta(hours=3), requests=10),
            # Older than 24 hours: not in the health figures.
            _rollup(endpoint, v1, "hour", floor_hour(now) - timedelta(hours=30), requests=500),
        ]
    )
    day = floor_day(now)
    DriftRollup.objects.bulk_create(
        [
            _drift(endpoint, v1, "day", day - timedelta(days=1), {"age": "drift", "plan": "ok"}),
            _drift(endpoint, v1, "day", day, {"age": "ok", "income": "drift", "plan": "drift"}),
        ]
    )
    DeploymentRequest.objects.create(
        model_version=v3,
        endpoint=endpoint,
        justification="next",
        requester=data_scientist,
        status="awaiting_review",
    )
    client.force_login(manager)
    response = client.get("/")
    assert response.status_code == 200
    (summary,) = response.context["summaries"]
    assert [(lv.version, lv.role, lv.traffic_weight) for lv in summary.live] == [
        (1, "stable", 90),
        (2, "canary", 10),
    ]
    assert (summary.health.requests, summary.health.errors) == (100, 10)
    assert summary.health.error_rate == pytest.approx(10 / 110)
    assert summary.health.latency_p95_ms == pytest.approx(20, rel=0.1)
    assert summary.pending_approvals == 1
    assert summary.open_alerts == 0
    (latest,) = summary.drift
    assert latest.drifted_features == ["income", "plan", "age"]  # age drifted yesterday
    html = response.content.decode()
    links = re.findall(r'<a class="drifted-feature" href="([^"]+)">([^<]+)</a>', html)
    base = f"/monitoring/endpoints/{endpoint.name}/?window=day&amp;feature="
    assert links == [(base + name, name) for name in ("income", "plan", "age")]
    assert "9.1%" in html  # error rate


def test_the_overview_counts_open_alerts_per_endpoint(
    client, endpoint, versions, manager, platform_admin
):
    from monitoring import alerts
    from monitoring.models import Alert

    rule = alerts.alert_rule_create(
        actor=platform_admin, endpoint=endpoint, kind="error_rate", threshold=0.05
    )
    now = timezone.now()
    Alert.objects.create(
        rule=rule,
        endpoint=endpoint,
        model_version=versions[0],
        window_start=now,
        window_end=now,
        observed=0.5,
        threshold=0.05,
        message="Error rate 50.0%",
        fired_at=now,
        action=rule.action,
    )

    counts = selectors.open_alert_counts([endpoint.pk, endpoint.pk + 1])
    assert counts[endpoint.pk] == 1 and not counts.get(endpoint.pk + 1)
    client.force_login(manager)
    page = client.get("/").content.decode()
    assert re.search(r'data-testid="open-alerts">\s*1\s*<', page)


def test_delivery_figures(endpoint, versions, data_scientist, manager, other_data_scientist):
    v1, v2, v3 = versions
    now = timezone.now()
    day = timedelta(days=1)
    # 1. v1 requested 10 days ago, live 2 days later, superseded by v2.
    _deployment(
        endpoint,
        v1,
        data_scientist,
        weight=0,
        status="retired",
        request_status="superseded",
        requested=now - 10 * day,
        live=now - 8 * day,
        retired=now - 5 * day,
    )
    # 2. v2 requested 6 days ago, live after 1 day, rolled back 6 hours after going live.
    _deployment(
        endpoint,
        v2,
        data_scientist,
        weight=0,
        status="retired",
        request_status="rolled_back",
        requested=now - 6 * day,
        live=now - 5 * day,
        retired=now - 5 * day + timedelta(hours=6),
    )
    # 3. v3 failed to deploy (never live).
    _deployment(
        endpoint,
        v3,
        data_scientist,
        weight=0,
        status="failed",
        request_status="failed",
        requested=now - 2 * day,
        live=None,
    )
    # 4. Outside the 90 days: not counted.
    _deployment(
        services.endpoint_for(
            model_version=v1, environment=Environment.objects.get(name="production")
        ),
        v1,
        data_scientist,
        weight=100,
        requested=now - 200 * day,
        live=now - 199 * day,
    )
    figures = selectors.delivery_figures(manager, now=now)
    assert figures.deployments_live == 2
    assert figures.deployments_per_week == pytest.approx(2 / (90 / 7))
    assert figures.lead_time_median == timedelta(days=1.5)  # median of 2 d and 1 d
    assert (figures.rollouts, figures.failed_rollouts) == (3, 2)
    assert figures.change_failure_rate == pytest.approx(2 / 3)
    assert figures.restores == 1
    assert figures.time_to_restore_median == timedelta(hours=6)
    # Another team sees none of it, and nothing is undefined silently.
    empty = selectors.delivery_figures(other_data_scientist, now=now)
    assert empty.deployments_live == 0 and empty.change_failure_rate is None
    assert empty.undefined["time_to_restore_median"] == "nothing was rolled back"


def test_overview_shows_undefined_delivery_figures(client, manager):
    client.force_login(manager)
    html = client.get("/").content.decode()
    assert "undefined (no rollout started)" in html
    assert "undefined (nothing was rolled back)" in html


# --- the metrics API ---------------------------------------------------------------------------


def test_metrics_api_per_window(client, endpoint, versions, stable_and_canary, manager):
    v1, v2, _ = versions
    now = timezone.now()
    h0, h1 = floor_hour(now) - timedelta(hours=1), floor_hour(now)
    Rollup.objects.bulk_create(
        [
            _rollup(endpoint, v1, "hour", h0, requests=4, confusion={"1": {"1": 2}}),
            _rollup(endpoint, v1, "hour", h1, requests=4, confusion={"1": {"0": 2}}),
            _rollup(endpoint, v2, "hour", h1, requests=4),
        ]
    )
    client.force_login(manager)
    response = client.get(f"/api/endpoints/{endpoint.name}/metrics", {"window": "hour", "days": 1})
    assert response.status_code == 200
    body = {row["version"]: row for row in response.json()}
    assert body[1]["role"] == "stable" and body[1]["window"] == "hour"
    assert body[1]["accuracy"] == 0.5 and body[1]["label_coverage"] == 0.5
    assert [w["accuracy"] for w in body[1]["windows"]] == [1.0, 0.0]
    assert body[1]["confusion"] == {"labels": ["0", "1"], "matrix": [[0, 0], [2, 2]]}
    assert body[2]["accuracy"] is None
    assert body[2]["undefined"]["accuracy"] == "no labeled predictions yet"
    assert [w["traffic_share"] for w in body[2]["windows"]] == [0.5]


def test_metrics_api_is_in_the_schema(client, manager):
    client.force_login(manager)
    response = client.get("/api/schema")
    assert response.status_code == 200
    text = response.content.decode()
    assert "/api/endpoints/{name}/metrics" in text
    assert "label_coverage" in text and "traffic_share" in text


# --- query budget -------------------------------------------------------------------------------


def _queries(client, url, params=None) -> list[str]:
    with CaptureQueriesContext(connection) as ctx:
        response = client.get(url, params or {})
    assert response.status_code == 200
    sql = [q["sql"] for q in ctx.captured_queries]
    assert not [s for s in sql if "rollouts_predictionlog" in s.lower()], "read the raw log"
    assert not [s for s in sql if "rollouts_servingerror" in s.lower()], "read the raw log"
    return sql


#: Queries of the two pages, whatever the number of versions, windows and rollups (session,
#: user, role groups and the page's own reads).
PAGE_BUDGET = 12  # with the drift baselines, whether the user may choose one, deleted live versions,
# and the traffic changes marked on the charts
OVERVIEW_BUDGET = 13  # 12 + the grouped count of open alerts


def test_query_budget(client, endpoint, versions, stable_and_canary, manager):
    """3 versions × 10 days of rollups, then × 60 days: the same queries, within budget."""
    now = timezone.now()
    client.force_login(manager)
    pages = (
        ("day", _url(endpoint), {"window": "day", "days": 90, "feature": "age"}),
        ("hour", _url(endpoint), {"window": "hour", "days": 2}),
        ("default", _url(endpoint), {}),
        ("api", f"/api/endpoints/{endpoint.name}/metrics", {"window": "day"}),
        ("overview", "/", {}),
    )
    measured = []
    for days, skip in ((10, 0), (60, 10)):
        _fill(endpoint, versions, days=days, now=now, skip=skip)
        assert Rollup.objects.filter(granularity="day").count() == 3 * days
        measured.append({name: len(_queries(client, url, params)) for name, url, params in pages})
    small, large = measured
    assert small == large
    assert max(small["day"], small["hour"], small["default"], small["api"]) <= PAGE_BUDGET, small
    assert small["overview"] <= OVERVIEW_BUDGET, small


def test_a_data_scientist_chooses_a_baseline_window_on_the_dashboard(
    client, endpoint, versions, data_scientist
):
    import uuid

    from monitoring.models import DriftBaseline
    from rollouts.models import PredictionLog

    v1 = versions[0]
    start = floor_hour(timezone.now()) - timedelta(days=2)
    PredictionLog.objects.bulk_create(
        PredictionLog(
            request_id=uuid.uuid4(),
            endpoint=endpoint,
            model_version=v1,
            features={"age": float(i)},
            prediction=1,
            latency_ms=5.0,
            created_at=start + timedelta(minutes=i),
        )
        for i in range(40)
    )
    client.force_login(data_scientist)
    url = f"/monitoring/endpoints/{endpoint.name}/baseline"
    assert 'data-testid="baseline-form"' in client.get(_url(endpoint)).content.decode()

    bad = client.post(url, {"version": 1, "start": "2026-01-02T00:00", "end": "2026-01-01T00:00"})
    assert bad.status_code == 400 and b"end after it starts" in bad.content
    assert client.post(url, {"version": 1}).status_code == 400  # no window
    assert client.post(url, {"version": 99, "clear": "1"}).status_code == 404

    window = {
        "start": f"{start:%Y-%m-%dT%H:%M}",
        "end": f"{start + timedelta(hours=1):%Y-%m-%dT%H:%M}",
    }
    response = client.post(url, {"version": 1, **window})

    assert response.status_code == 302
    baseline = DriftBaseline.objects.get()
    assert (baseline.model_version, baseline.start, baseline.chosen_by) == (
        v1,
        start,
        data_scientist,
    )
    page = client.get(_url(endpoint)).content.decode()
    assert "baseline window" in page and "Back to the training sample" in page
    assert client.post(url, {"version": 1, "clear": "1"}).status_code == 302
    assert not DriftBaseline.objects.exists()

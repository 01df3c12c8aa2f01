"""Alert rules evaluated on constructed rollups: each kind fires and resolves, undefined figures
never fire, no duplicates; acknowledgement and scoping; the rollback and retraining actions;
e-mail; rule management and its bad input."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from monitoring import alerts, metrics
from monitoring.models import (
    Alert,
    AlertRule,
    DriftRollup,
    Granularity,
    RetrainingRequest,
    Rollup,
)
from monitoring.rollups import floor_hour
from portal.audit import audit_verify
from portal.models import AuditEvent
from registry.models import ModelVersion, RegisteredModel
from rollouts.models import Deployment, DeploymentRequest, Endpoint, Environment

Status = DeploymentRequest.Status
NOW = timezone.now()
HOUR = floor_hour(NOW)


@pytest.fixture
def world(team, data_scientist):
    """``churn`` of ``team``: v1 and v2 (offline accuracy 0.92), v2 live on churn-staging."""
    model = RegisteredModel.objects.create(name="churn", team=team, synced_at=NOW)
    signature = {"inputs": [{"type": "double", "name": "tenure"}], "outputs": [{"type": "long"}]}
    versions = [
        ModelVersion.objects.create(
            registered_model=model,
            version=n,
            status="READY",
            run_id=f"run{n}",
            synced_at=NOW,
            signature=signature,
            metrics={"accuracy": 0.9 + n / 100},
        )
        for n in (1, 2)
    ]
    endpoint = Endpoint.objects.create(
        name="churn-staging",
        environment=Environment.objects.get(name="staging"),
        registered_model=model,
    )
    req = DeploymentRequest.objects.create(
        model_version=versions[1],
        endpoint=endpoint,
        justification="test",
        requester=data_scientist,
        status=Status.LIVE,
    )
    Deployment.objects.create(
        endpoint=endpoint,
        model_version=versions[1],
        request=req,
        status=Deployment.Status.LIVE,
        traffic_weight=100,
        live_at=NOW,
    )
    return {"endpoint": endpoint, "v1": versions[0], "v2": versions[1]}


def _rollup(endpoint, version, hour=HOUR, *, latencies=(), **fields):
    defaults = {
        "requests": len(latencies),
        "rows": len(latencies),
        "latency_hist": metrics.latency_histogram(latencies),
        "task": "classification",
        "computed_at": NOW,
    }
    return Rollup.objects.update_or_create(
        endpoint=endpoint,
        model_version=version,
        granularity=Granularity.HOUR,
        window_start=hour,
        defaults={**defaults, **fields},
    )[0]


def _rule(endpoint, kind, threshold=None, **fields):
    return alerts.alert_rule_create(
        actor=None,
        endpoint=endpoint,
        kind=kind,
        threshold=threshold,
        **{"min_samples": 50, "window_hours": 6, **fields},
    )


def _evaluate(capture=None):
    if capture is None:
        return alerts.alerts_evaluate(now=NOW)
    with capture(execute=True):
        return alerts.alerts_evaluate(now=NOW)


def _active(rule):
    return Alert.objects.filter(rule=rule, status__in=alerts.ACTIVE)


def _events(action):
    return AuditEvent.objects.filter(action=action)


# --- each kind fires, does not duplicate, resolves ------------------------------------------


def test_error_rate_fires_once_and_resolves(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "error_rate", 0.05)
    _rollup(endpoint, v2, requests=60, rows=60, errors=0)
    _rollup(endpoint, v2, HOUR - timedelta(hours=1), requests=30, rows=30, errors=10)
    # Outside the 6-hour window: ignored.
    _rollup(endpoint, v2, HOUR - timedelta(hours=6), requests=10, rows=10, errors=1000)
    result = _evaluate()
    alert = Alert.objects.get(rule=rule)
    assert result.fired == [alert.pk]
    assert alert.observed == pytest.approx(10 / 100) and alert.threshold == 0.05
    assert alert.model_version == v2 and alert.status == Alert.Status.OPEN
    assert alert.evidence["figures"]["errors"] == 10 and alert.evidence["figures"]["requests"] == 90
    assert alert.evidence["window"]["end"] == (HOUR + timedelta(hours=1)).isoformat()
    assert alert.evidence["rule"]["kind"] == "error_rate"
    assert "Error rate 10.0%" in alert.message

    assert _evaluate().fired == []  # the condition still holds: no duplicate
    assert Alert.objects.filter(rule=rule).count() == 1 and _events("alert.fired").count() == 1

    _rollup(endpoint, v2, HOUR - timedelta(hours=1), requests=30, rows=30, errors=1)
    assert _evaluate().resolved == [alert.pk]
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED and alert.resolved_at
    assert "back within the threshold" in alert.resolution
    assert _events("alert.resolved").count() == 1
    assert _evaluate().resolved == []
    assert audit_verify().intact


def test_latency_percentile_fires_and_resolves(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "latency", 200.0, percentile=99)
    _rollup(endpoint, v2, latencies=[10.0] * 97 + [500.0] * 3)
    _evaluate()
    alert = _active(rule).get()
    merged_hist = metrics.latency_histogram([10.0] * 97 + [500.0] * 3)
    assert alert.observed == pytest.approx(metrics.latency_percentile(merged_hist, 99))
    assert alert.observed > 200
    # p95 of the same window is fine: a p95 rule does not fire.
    p95 = _rule(endpoint, "latency", 200.0, percentile=95)
    _evaluate()
    assert not Alert.objects.filter(rule=p95).exists()
    _rollup(endpoint, v2, latencies=[10.0] * 100)
    _evaluate()
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED


def test_accuracy_drop_against_the_offline_figure(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "accuracy_drop", 0.05, min_samples=20)
    # 60 of 100 labeled rows right: 0.60 < 0.92 - 0.05.
    _rollup(
        endpoint,
        v2,
        rows=200,
        requests=200,
        labeled=100,
        confusion={"1": {"1": 30, "0": 20}, "0": {"0": 30, "1": 20}},
    )
    _evaluate()
    alert = _active(rule).get()
    assert alert.observed == pytest.approx(0.6)
    assert alert.threshold == pytest.approx(0.92 - 0.05)
    assert alert.evidence["figures"]["offline_accuracy"] == pytest.approx(0.92)
    assert alert.evidence["figures"]["label_coverage"] == pytest.approx(0.5)
    _rollup(
        endpoint,
        v2,
        rows=200,
        requests=200,
        labeled=100,
        confusion={"1": {"1": 50}, "0": {"0": 45, "1": 5}},
    )
    _evaluate()
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED


@pytest.mark.parametrize(
    "case",
    ["no_labels", "few_labels", "no_offline_accuracy", "nan_offline_accuracy", "regression"],
)
def test_undefined_accuracy_never_fires_nor_resolves(world, case):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "accuracy_drop", 0.05, min_samples=20)
    bad = {"1": {"0": 100}}
    fields = {"rows": 500, "requests": 500, "labeled": 100, "confusion": bad}
    if case == "no_labels":
        fields.update(labeled=0, confusion={}, rows=500)
        rule.min_samples = 0  # not allowed through the service: forced to reach the figure
        AlertRule.objects.filter(pk=rule.pk).update(min_samples=0)
    elif case == "few_labels":
        fields.update(labeled=10, confusion={"1": {"0": 10}})
    elif case == "no_offline_accuracy":
        ModelVersion.objects.filter(pk=v2.pk).update(metrics={"f1": 0.9})
    elif case == "nan_offline_accuracy":
        ModelVersion.objects.filter(pk=v2.pk).update(metrics={"accuracy": "nan"})
    elif case == "regression":
        fields.update(task="regression", confusion={}, squared_error_sum=10.0)
    _rollup(endpoint, v2, **fields)
    result = _evaluate()
    assert result.fired == [] and result.undefined == 1
    assert not Alert.objects.exists()
    # An open alert is not resolved by an undefined figure either.
    alert = Alert.objects.create(
        rule=rule,
        endpoint=endpoint,
        model_version=v2,
        window_start=HOUR,
        window_end=HOUR,
        observed=0.1,
        threshold=0.8,
        message="x",
        fired_at=NOW,
        action="notify",
    )
    _evaluate()
    alert.refresh_from_db()
    assert alert.status == Alert.Status.OPEN


def test_min_samples_makes_error_rate_and_latency_undefined(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    _rule(endpoint, "error_rate", 0.05)
    _rule(endpoint, "latency", 1.0)
    _rollup(endpoint, v2, latencies=[900.0] * 5, errors=40)  # 45 requests in all, 5 answered
    result = _evaluate()
    assert result.undefined == 2 and not Alert.objects.exists()


def test_label_coverage_skips_fresh_windows(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "label_coverage", 0.5, label_delay_hours=24, window_hours=24)
    # Fresh hours without labels are not judged...
    _rollup(endpoint, v2, rows=1000, requests=1000, labeled=0)
    _rollup(endpoint, v2, HOUR - timedelta(hours=23), rows=1000, requests=1000, labeled=0)
    assert _evaluate().undefined == 1 and not Alert.objects.exists()
    # ...hours older than the delay are.
    old = HOUR - timedelta(hours=30)
    _rollup(endpoint, v2, old, rows=200, requests=200, labeled=20)
    _evaluate()
    alert = _active(rule).get()
    assert alert.observed == pytest.approx(0.1)
    assert alert.window_end == HOUR - timedelta(hours=24)
    _rollup(endpoint, v2, old, rows=200, requests=200, labeled=150)
    _evaluate()
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED


def _drift(
    endpoint, version, start=HOUR, *, drifted, share, features=(), rows=500, granularity="hour"
):
    return DriftRollup.objects.update_or_create(
        endpoint=endpoint,
        model_version=version,
        granularity=granularity,
        window_start=start,
        defaults={
            "rows": rows,
            "reference": "training sample",
            "drifted": drifted,
            "share_drifted": share,
            "result": {
                "drifted": drifted,
                "share_drifted": share,
                "drift_share": 0.5,
                "reason": "" if drifted is not None else "insufficient data: 3 rows",
                "features": list(features),
                "prediction": None,
            },
            "computed_at": NOW,
        },
    )[0]


def test_dataset_drift_fires_and_resolves(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "drift", None)
    features = [
        {"name": "tenure", "status": "drift", "psi": 0.9},
        {"name": "plan", "status": "ok", "psi": 0.01},
    ]
    _drift(endpoint, v2, HOUR - timedelta(hours=1), drifted=True, share=0.5, features=features)
    # The latest hour has too few rows for the rule: the one before it is read.
    _drift(endpoint, v2, drifted=False, share=0.0, rows=3)
    _evaluate()
    alert = _active(rule).get()
    assert alert.observed == 0.5 and alert.threshold == 0.5
    assert alert.window_start == HOUR - timedelta(hours=1)
    assert alert.evidence["figures"]["drifted_features"] == ["tenure"]
    _drift(endpoint, v2, drifted=False, share=0.0, rows=500)
    _evaluate()
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED


def test_insufficient_drift_data_never_fires(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    _rule(endpoint, "drift", None)
    _rule(endpoint, "drift", 0.2, feature="tenure")
    _drift(
        endpoint,
        v2,
        drifted=None,
        share=None,
        features=[
            {"name": "tenure", "status": "insufficient data", "psi": None, "reason": "all null"}
        ],
    )
    result = _evaluate()
    assert result.undefined == 2 and not Alert.objects.exists()


def test_feature_psi_and_status(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    by_psi = _rule(endpoint, "drift", 0.2, feature="tenure")
    by_status = _rule(endpoint, "drift", None, feature="tenure")
    daily = _rule(endpoint, "drift", 0.2, feature="tenure", granularity="day", window_hours=48)
    features = [{"name": "tenure", "status": "warning", "psi": 0.22}]
    _drift(endpoint, v2, drifted=False, share=0.0, features=features)
    _evaluate()
    assert _active(by_psi).get().observed == pytest.approx(0.22)
    assert not _active(by_status).exists()  # a warning is not drift
    assert not _active(daily).exists()  # no day window yet
    _drift(
        endpoint,
        v2,
        HOUR.replace(hour=0),
        drifted=False,
        share=0.0,
        features=[{"name": "tenure", "status": "drift", "psi": 0.3}],
        granularity="day",
    )
    _drift(
        endpoint,
        v2,
        drifted=False,
        share=0.0,
        features=[{"name": "tenure", "status": "drift", "psi": 0.3}],
    )
    _evaluate()
    assert _active(by_status).get().threshold == 0.25  # the endpoint's PSI drift threshold
    assert _active(daily).get().window_end - _active(daily).get().window_start == timedelta(days=1)


def test_alert_on_a_version_that_no_longer_serves_is_resolved(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "error_rate", 0.05)
    _rollup(endpoint, v2, requests=50, errors=50)
    _evaluate()
    alert = _active(rule).get()
    Deployment.objects.filter(endpoint=endpoint).update(status=Deployment.Status.RETIRED)
    _evaluate()
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED and "no longer serves" in alert.resolution


def test_open_alert_counts(world):
    endpoint, v2 = world["endpoint"], world["v2"]
    _rule(endpoint, "error_rate", 0.05)
    _rule(endpoint, "latency", 1.0)
    _rollup(endpoint, v2, latencies=[50.0] * 100, errors=50)
    _evaluate()
    assert alerts.open_alert_counts([endpoint.pk, 999]) == {endpoint.pk: 2, 999: 0}
    assert alerts.open_alert_counts([]) == {}


def test_beat_runs_the_task(world):
    from monitoring import tasks

    assert (
        settings.CELERY_BEAT_SCHEDULE["evaluate-alerts"]["task"]
        == "monitoring.tasks.evaluate_alerts"
    )
    _rule(world["endpoint"], "error_rate", 0.05)
    _rollup(world["endpoint"], world["v2"], requests=50, errors=50)
    assert tasks.evaluate_alerts.delay().get()["fired"] == 1
    assert tasks.evaluate_alerts.delay().get()["fired"] == 0


# --- e-mail ---------------------------------------------------------------------------------


def test_email_goes_to_the_team_and_managers_once(
    world,
    data_scientist,
    other_data_scientist,
    reviewer,
    manager,
    django_capture_on_commit_callbacks,
):
    _rule(world["endpoint"], "error_rate", 0.05)
    _rollup(world["endpoint"], world["v2"], requests=50, errors=50)
    mail.outbox.clear()
    result = _evaluate(django_capture_on_commit_callbacks)
    assert len(result.notifications) == 1
    assert sorted(m.to[0] for m in mail.outbox) == ["alice@example.com", "carol@example.com"]
    message = mail.outbox[0]
    assert "churn-staging" in message.subject and "Error rate 50.0%" in message.body
    assert f"/monitoring/alerts/{result.fired[0]}/" in message.body
    assert Alert.objects.get().notified_at is not None
    _evaluate(django_capture_on_commit_callbacks)
    assert len(mail.outbox) == 2


# --- acknowledgement and the pages ----------------------------------------------------------


@pytest.fixture
def fired(world):
    _rule(world["endpoint"], "error_rate", 0.05)
    _rollup(world["endpoint"], world["v2"], requests=50, errors=50)
    _evaluate()
    return Alert.objects.get()


def test_acknowledge(client, fired, data_scientist, manager, outsider, other_data_scientist):
    url = f"/monitoring/alerts/{fired.pk}/acknowledge"
    client.force_login(manager)
    assert client.get(f"/monitoring/alerts/{fired.pk}/").status_code == 200
    assert client.post(url).status_code == 403
    for user in (outsider, other_data_scientist):
        client.force_login(user)
        assert client.get(f"/monitoring/alerts/{fired.pk}/").status_code == 404
        assert client.post(url).status_code == 404
    assert client.post("/monitoring/alerts/99999/acknowledge").status_code == 404
    fired.refresh_from_db()
    assert fired.status == Alert.Status.OPEN and not _events("alert.acknowledged").exists()

    client.force_login(data_scientist)
    page = client.get(f"/monitoring/alerts/{fired.pk}/")
    assert b'data-testid="acknowledge"' in page.content and b"error_rate" in page.content
    assert client.get(url).status_code == 405
    response = client.post(url)
    assert response.status_code == 302
    fired.refresh_from_db()
    assert fired.status == Alert.Status.ACKNOWLEDGED and fired.acknowledged_by == data_scientist
    assert _events("alert.acknowledged").get().actor == data_scientist
    again = client.post(url)
    assert again.status_code == 409 and b"already acknowledged by alice" in again.content

    # Acknowledged is still active: no duplicate while the condition holds; resolves after.
    _evaluate()
    assert Alert.objects.count() == 1
    _rollup(fired.endpoint, fired.model_version, requests=50, errors=0)
    _evaluate()
    fired.refresh_from_db()
    assert fired.status == Alert.Status.RESOLVED
    assert client.post(url).status_code == 409


def test_acknowledge_needs_csrf(fired, data_scientist):
    from django.test import Client

    strict = Client(enforce_csrf_checks=True)
    strict.force_login(data_scientist)
    assert strict.post(f"/monitoring/alerts/{fired.pk}/acknowledge").status_code == 403
    fired.refresh_from_db()
    assert fired.status == Alert.Status.OPEN


def test_alert_list_is_scoped(
    client, fired, data_scientist, manager, outsider, other_data_scientist
):
    for user, expected in (
        (data_scientist, [fired.pk]),
        (manager, [fired.pk]),
        (outsider, []),
        (other_data_scientist, []),
    ):
        client.force_login(user)
        page = client.get("/monitoring/alerts/")
        assert page.status_code == 200
        assert [a.pk for a in page.context["active"]] == expected, user
        assert bool(page.context["rules"]) == bool(expected)
    client.force_login(data_scientist)
    assert b'href="/monitoring/alerts/"' in client.get("/monitoring/alerts/").content  # nav
    assert client.get("/monitoring/alerts/?status=bogus").status_code == 400
    assert client.get("/monitoring/alerts/?endpoint=nope").status_code == 404
    assert (
        client.get("/monitoring/alerts/?status=resolved&endpoint=churn-staging").status_code == 200
    )
    client.force_login(other_data_scientist)
    assert client.get("/monitoring/alerts/?endpoint=churn-staging").status_code == 404
    client.logout()
    assert client.get("/monitoring/alerts/").status_code == 302


# --- rule management ------------------------------------------------------------------------


def _rule_post(**overrides):
    data = {
        "kind": "error_rate",
        "threshold": "0.05",
        "granularity": "hour",
        "percentile": "95",
        "window_hours": "6",
        "min_samples": "100",
        "label_delay_hours": "24",
        "action": "notify",
        "enabled": "on",
        "name": "",
        "feature": "",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def test_platform_admin_creates_and_edits_rules(
    client, world, platform_admin, manager, data_scientist
):
    data = _rule_post(endpoint=world["endpoint"].pk)
    for user in (manager, data_scientist):
        client.force_login(user)
        assert client.get("/monitoring/alerts/rules/new").status_code == 403
        assert client.post("/monitoring/alerts/rules/new", data).status_code == 403
    assert not AlertRule.objects.exists()
    client.force_login(platform_admin)
    assert client.get("/monitoring/alerts/rules/new").status_code == 200
    response = client.post("/monitoring/alerts/rules/new", data)
    assert response.status_code == 302, response.content
    rule = AlertRule.objects.get()
    assert (rule.kind, rule.threshold, rule.created_by) == ("error_rate", 0.05, platform_admin)
    assert _events("alert_rule.created").get().actor == platform_admin

    edit = f"/monitoring/alerts/rules/{rule.pk}/"
    assert client.get(edit).status_code == 200
    assert client.post(edit, _rule_post(threshold="0.1")).status_code == 302
    rule.refresh_from_db()
    assert rule.threshold == 0.1
    assert _events("alert_rule.updated").get().after == {"threshold": 0.1}
    client.force_login(manager)
    assert client.post(edit, _rule_post(threshold="0.2")).status_code == 403
    assert client.post(f"{edit}enabled", {"enabled": "0"}).status_code == 403


def test_disabling_a_rule_resolves_its_alert(client, fired, platform_admin):
    client.force_login(platform_admin)
    url = f"/monitoring/alerts/rules/{fired.rule_id}/enabled"
    assert client.post(url, {"enabled": "maybe"}).status_code == 400
    assert client.post(url, {"enabled": "0"}).status_code == 302
    fired.refresh_from_db()
    assert fired.status == Alert.Status.RESOLVED and fired.resolution == "the rule was disabled"
    _evaluate()
    assert Alert.objects.count() == 1


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"threshold": ""}, "threshold"),
        ({"threshold": "5"}, "threshold"),
        ({"threshold": "-0.1"}, "threshold"),
        ({"threshold": "nan"}, "threshold"),
        ({"threshold": "inf"}, "threshold"),
        ({"threshold": "abc"}, "threshold"),
        ({"kind": "latency", "threshold": "0"}, "threshold"),
        ({"kind": "accuracy_drop", "threshold": "1.5"}, "threshold"),
        ({"kind": "drift", "threshold": "2"}, "threshold"),
        ({"kind": "latency", "threshold": "100", "feature": "tenure"}, "feature"),
        ({"kind": "bogus"}, "kind"),
        ({"action": "explode"}, "action"),
        ({"percentile": "50"}, "percentile"),
        ({"window_hours": "0"}, "window_hours"),
        ({"window_hours": "100000"}, "window_hours"),
        ({"min_samples": "0"}, "min_samples"),
        ({"min_samples": "-3"}, "min_samples"),
        ({"endpoint": "99999"}, "endpoint"),
    ],
)
def test_bad_rule_input_is_a_form_error(client, world, platform_admin, overrides, field):
    client.force_login(platform_admin)
    data = _rule_post(endpoint=world["endpoint"].pk)
    data.update(overrides)
    response = client.post("/monitoring/alerts/rules/new", data)
    assert response.status_code == 400
    assert field in response.context["form"].errors, response.context["form"].errors
    assert not AlertRule.objects.exists()


def test_rule_services_refuse_bad_input(world, manager):
    endpoint = world["endpoint"]
    with pytest.raises(PermissionDenied):
        alerts.alert_rule_create(actor=manager, endpoint=endpoint, kind="error_rate", threshold=0.1)
    with pytest.raises(ValidationError) as exc:
        alerts.alert_rule_create(
            actor=None, endpoint=endpoint, kind="error_rate", threshold=float("nan")
        )
    assert "threshold" in exc.value.message_dict
    with pytest.raises(ValidationError):
        alerts.alert_rule_create(
            actor=None, endpoint=endpoint, kind="error_rate", threshold=0.1, colour="red"
        )
    rule = _rule(endpoint, "error_rate", 0.1)
    with pytest.raises(ValidationError):
        alerts.alert_rule_update(rule_id=rule.pk, actor=None, changes={"threshold": None})
    rule.refresh_from_db()
    assert rule.threshold == 0.1


# --- actions --------------------------------------------------------------------------------


def _mlflow_alias(alias: str) -> int:
    import mlflow

    from tests.conftest import REGISTERED_MODEL

    client = mlflow.MlflowClient(settings.MLFLOW_TRACKING_URI)
    return int(client.get_model_version_by_alias(REGISTERED_MODEL, alias).version)


def test_rollback_action_rolls_back_the_live_deployment(
    synced, deploy, manager, django_capture_on_commit_callbacks
):
    v1, v2 = synced
    Environment.objects.filter(name="staging").update(metric_tolerance=0.1)
    first = deploy(v1, "staging")
    second = deploy(v2, "staging")
    assert _mlflow_alias("staging") == 2
    endpoint = second.endpoint
    rule = _rule(endpoint, "error_rate", 0.05, action="rollback")
    _rollup(endpoint, v2, requests=80, errors=20)
    mail.outbox.clear()
    _evaluate(django_capture_on_commit_callbacks)

    alert = Alert.objects.get(rule=rule)
    assert alert.model_version == v2
    assert alert.action_status == Alert.ActionStatus.SUCCEEDED, alert.action_result
    assert alert.action_result.startswith("Rolled back to v1")
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.status, second.status) == (Status.LIVE, Status.ROLLED_BACK)
    assert second.status_reason.startswith(f"alert #{alert.pk}:")
    live = Deployment.objects.get(endpoint=endpoint, status=Deployment.Status.LIVE)
    assert (live.model_version, live.traffic_weight) == (v1, 100)
    assert _mlflow_alias("staging") == 1
    rolled = AuditEvent.objects.get(action="deployment.rolled_back", object_id=str(second.pk))
    assert rolled.actor is None and rolled.actor_label == "system"
    action = _events("alert.action").get()
    assert action.after["status"] == "succeeded" and action.object_id == str(alert.pk)
    alert_mail = [m for m in mail.outbox if "Alert" in m.subject]
    assert alert_mail and "Rolled back to v1" in alert_mail[0].body

    # The next run resolves the alert (v2 no longer serves) and rolls back nothing more.
    _evaluate()
    alert.refresh_from_db()
    assert alert.status == Alert.Status.RESOLVED
    assert AuditEvent.objects.filter(action="deployment.rolled_back").count() == 1
    assert audit_verify().intact


def test_nothing_to_roll_back_is_recorded_on_the_alert(synced, deploy):
    v1, _ = synced
    req = deploy(v1, "staging")
    rule = _rule(req.endpoint, "error_rate", 0.05, action="rollback")
    _rollup(req.endpoint, v1, requests=80, errors=20)
    result = _evaluate()
    alert = Alert.objects.get(rule=rule)
    assert result.actions == 1
    assert alert.action_status == Alert.ActionStatus.FAILED
    assert "no earlier release" in alert.action_result
    req.refresh_from_db()
    assert req.status == Status.LIVE
    assert _events("alert.action").get().after["status"] == "failed"
    assert not _events("deployment.rolled_back").exists()
    _evaluate()  # not retried
    assert _events("alert.action").count() == 1


def test_retraining_request_with_evidence(world, client, data_scientist):
    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "accuracy_drop", 0.05, min_samples=10, action="retraining_request")
    _rollup(endpoint, v2, rows=100, requests=100, labeled=40, confusion={"1": {"0": 30, "1": 10}})
    _evaluate()
    alert = Alert.objects.get(rule=rule)
    retraining = RetrainingRequest.objects.get()
    assert (retraining.endpoint, retraining.model_version, retraining.alert) == (
        endpoint,
        v2,
        alert,
    )
    assert retraining.created_by is None and retraining.status == RetrainingRequest.Status.OPEN
    assert retraining.evidence["figures"]["accuracy"] == pytest.approx(0.25)
    assert retraining.evidence["rule"]["id"] == rule.pk and retraining.evidence["window"]
    assert retraining.evidence["alert"] == alert.pk
    assert "Accuracy 25.0%" in retraining.reason
    assert _events("retraining_request.opened").get().actor is None
    assert alert.action_result == f"Opened retraining request #{retraining.pk}."
    client.force_login(data_scientist)
    assert f"#{retraining.pk}".encode() in client.get(f"/monitoring/alerts/{alert.pk}/").content

    # Fires again later while the request is still open: no second request.
    AlertRule.objects.filter(pk=rule.pk).update(enabled=False)
    Alert.objects.filter(pk=alert.pk).update(status=Alert.Status.RESOLVED)
    AlertRule.objects.filter(pk=rule.pk).update(enabled=True)
    _evaluate()
    assert Alert.objects.filter(rule=rule).count() == 2
    assert RetrainingRequest.objects.count() == 1
    assert "already open" in Alert.objects.filter(rule=rule).first().action_result
    alerts.retraining_request_close(request_id=retraining.pk, actor=data_scientist)
    with pytest.raises(Exception, match="already closed"):
        alerts.retraining_request_close(request_id=retraining.pk, actor=data_scientist)


# --- on rollups refreshed from the log, and in the admin ------------------------------------


def test_rules_read_rollups_refreshed_from_the_log(world):
    """The whole path: logged predictions and errors, the rollup refresh, the evaluation."""
    import uuid

    from monitoring import rollups
    from rollouts.models import PredictionLog, ServingError

    endpoint, v2 = world["endpoint"], world["v2"]
    rule = _rule(endpoint, "error_rate", 0.1, min_samples=10)
    logged = [
        PredictionLog.objects.create(
            endpoint=endpoint,
            model_version=v2,
            features={"tenure": float(i)},
            prediction=1,
            latency_ms=5.0,
            created_at=NOW - timedelta(minutes=i),
        )
        for i in range(8)
    ] + [
        ServingError.objects.create(
            request_id=uuid.uuid4(),
            endpoint=endpoint,
            model_version=v2,
            status_code=400,
            error_code="BAD_REQUEST",
            created_at=NOW - timedelta(minutes=i),
        )
        for i in range(4)
    ]
    rollups.mark_logged_rows(logged)
    rollups.rollups_refresh(with_drift=False)
    _evaluate()
    alert = _active(rule).get()
    assert alert.observed == pytest.approx(4 / 12)
    assert alert.evidence["figures"] | {"labeled": 0} == {
        "requests": 8,
        "rows": 8,
        "errors": 4,
        "labeled": 0,
        "error_rate": pytest.approx(4 / 12),
    }


def test_admin_edits_rules_through_the_services(client, world, platform_admin):
    client.force_login(platform_admin)
    assert client.get("/admin/monitoring/alertrule/add/").status_code == 200
    data = _rule_post(endpoint=world["endpoint"].pk)
    response = client.post("/admin/monitoring/alertrule/add/", {**data, "threshold": "7"})
    assert response.status_code == 200 and "threshold" in response.context["adminform"].form.errors
    assert not AlertRule.objects.exists()
    assert client.post("/admin/monitoring/alertrule/add/", data).status_code == 302
    rule = AlertRule.objects.get()
    assert _events("alert_rule.created").get().actor == platform_admin
    change = f"/admin/monitoring/alertrule/{rule.pk}/change/"
    assert client.get(change).status_code == 200
    assert client.post(change, {**data, "threshold": "0.2"}).status_code == 302
    rule.refresh_from_db()
    assert rule.threshold == 0.2 and _events("alert_rule.updated").count() == 1
    assert client.get("/admin/monitoring/alert/").status_code == 200
    assert client.get("/admin/monitoring/retrainingrequest/").status_code == 200

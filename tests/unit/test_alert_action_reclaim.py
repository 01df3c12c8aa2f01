"""An alert action whose worker died (left ``running``) is reclaimed by beat: run again within
ALERT_ACTION_MAX_ATTEMPTS, then failed with the reason; its e-mail is sent either way."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from monitoring import alerts, tasks
from monitoring.models import Alert, RetrainingRequest
from portal.audit import audit_verify
from portal.models import AuditEvent
from tests.unit.test_alerts import _evaluate, _rollup, _rule, world  # noqa: F401 - fixture


@pytest.fixture
def abandoned(world, monkeypatch):  # noqa: F811
    """A retraining action claimed by a worker that died before it opened the request."""
    rule = _rule(world["endpoint"], "error_rate", 0.05, action="retraining_request")
    _rollup(world["endpoint"], world["v2"], requests=50, errors=50)

    def die(alert):
        raise SystemExit("worker killed")  # nothing after the claim runs

    monkeypatch.setattr(alerts, "_open_retraining_request", die)
    with pytest.raises(SystemExit):
        _evaluate()
    monkeypatch.undo()
    alert = Alert.objects.get(rule=rule)
    assert alert.action_status == Alert.ActionStatus.RUNNING
    assert alert.action_attempts == 1 and alert.action_lease_until is not None
    return alert


def _lapse(alert):
    Alert.objects.filter(pk=alert.pk).update(
        action_lease_until=timezone.now() - timedelta(seconds=1)
    )


def test_a_live_lease_is_left_alone(abandoned, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.reclaim_alert_actions.delay().get() == 0
        _evaluate()  # the evaluation neither reruns nor e-mails a running action
    abandoned.refresh_from_db()
    assert abandoned.action_status == Alert.ActionStatus.RUNNING
    assert not RetrainingRequest.objects.exists() and not mail.outbox


def test_beat_reruns_an_abandoned_action_and_sends_its_email(
    abandoned, django_capture_on_commit_callbacks
):
    _lapse(abandoned)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.reclaim_alert_actions.delay().get() == 1
    abandoned.refresh_from_db()
    assert abandoned.action_status == Alert.ActionStatus.SUCCEEDED, abandoned.action_result
    assert abandoned.action_attempts == 2 and abandoned.action_lease_until is None
    assert RetrainingRequest.objects.get().alert_id == abandoned.pk
    assert AuditEvent.objects.filter(action="alert.action_reclaimed").count() == 1
    assert AuditEvent.objects.get(action="alert.action").after["attempt"] == 2
    assert mail.outbox and "Opened retraining request" in mail.outbox[0].body
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.reclaim_alert_actions.delay().get() == 0  # nothing more to do
    assert RetrainingRequest.objects.count() == 1
    assert audit_verify().intact


def test_an_action_abandoned_too_often_fails_with_the_reason(
    abandoned, settings, django_capture_on_commit_callbacks
):
    settings.ALERT_ACTION_MAX_ATTEMPTS = 1
    _lapse(abandoned)
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        assert alerts.alert_actions_reclaim() == [abandoned.pk]
    abandoned.refresh_from_db()
    assert abandoned.action_status == Alert.ActionStatus.FAILED
    assert "gave up after 1 attempts" in abandoned.action_result
    assert not RetrainingRequest.objects.exists()
    assert AuditEvent.objects.get(action="alert.action").after["status"] == "failed"
    assert mail.outbox and "gave up" in mail.outbox[0].body


def test_a_late_finisher_does_not_overwrite_the_reclaimed_run(world, monkeypatch):  # noqa: F811
    """An attempt that outlived its lease was reclaimed (a second attempt holds the action):
    the first one's outcome is not written over the second's claim."""
    rule = _rule(world["endpoint"], "error_rate", 0.05, action="retraining_request")
    _rollup(world["endpoint"], world["v2"], requests=50, errors=50)

    def slow(alert):
        Alert.objects.filter(pk=alert.pk).update(action_attempts=2)  # reclaimed meanwhile
        return Alert.ActionStatus.FAILED, "late"

    monkeypatch.setattr(alerts, "_open_retraining_request", slow)
    _evaluate()
    alert = Alert.objects.get(rule=rule)
    assert (alert.action_status, alert.action_attempts) == (Alert.ActionStatus.RUNNING, 2)
    assert alert.action_result == ""
    assert not AuditEvent.objects.filter(action="alert.action").exists()


def test_a_rerun_rollback_does_not_go_one_release_further_back(
    synced, deploy, django_capture_on_commit_callbacks, monkeypatch
):
    """The worker died after the rollback committed but before the outcome was written: the
    rerun sees the version no longer serves and rolls back nothing more."""
    from rollouts import services as rollout_services
    from rollouts.models import DeploymentRequest, Environment

    v1, v2 = synced

    Environment.objects.filter(name="staging").update(metric_tolerance=0.1)
    first = deploy(v1, "staging")
    deploy(v2, "staging")
    endpoint = first.endpoint
    rule = _rule(endpoint, "error_rate", 0.05, action="rollback")
    _rollup(endpoint, v2, requests=80, errors=20)
    real = rollout_services.deployment_rollback

    def rollback_then_die(**kwargs):
        real(**kwargs)
        raise SystemExit("worker killed")

    monkeypatch.setattr(rollout_services, "deployment_rollback", rollback_then_die)
    with pytest.raises(SystemExit):
        _evaluate()
    monkeypatch.undo()
    alert = Alert.objects.get(rule=rule)
    _lapse(alert)
    alerts.alert_actions_reclaim()
    alert.refresh_from_db()
    assert alert.action_status == Alert.ActionStatus.SUCCEEDED
    assert "earlier attempt" in alert.action_result
    assert AuditEvent.objects.filter(action="deployment.rolled_back").count() == 1
    first.refresh_from_db()
    assert first.status == DeploymentRequest.Status.LIVE

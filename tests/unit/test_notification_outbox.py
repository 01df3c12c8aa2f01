"""Notifications survive a broker outage (issue 9, point 4): a transactional outbox written with
the state change, sent by the task or, when the broker was down, by beat once it is back; never
twice; bounded attempts. Alert e-mails are marked notified only after the send succeeded."""

from __future__ import annotations

from datetime import timedelta

import pytest
from celery.app.task import Task
from celery.exceptions import Retry
from django.core import mail
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError

from monitoring import alerts
from monitoring.models import Alert
from portal import leases
from rollouts import notifications, services, tasks
from rollouts.models import NotificationOutbox
from tests.unit.test_alerts import _evaluate, _rollup, _rule, world  # noqa: F401 - fixture

Outbox = NotificationOutbox.Status
APPROVED = "was approved"


@pytest.fixture
def broker():
    """``down()``: publishing any task fails as it does with the broker unreachable (what
    kombu raises for a closed port); ``up()``: it works again."""
    real = Task.apply_async

    def refuse(self, *args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")

    class Broker:
        @staticmethod
        def down() -> None:
            Task.apply_async = refuse

        @staticmethod
        def up() -> None:
            Task.apply_async = real

    yield Broker
    Task.apply_async = real


def _approved_mails() -> list:
    return [m for m in mail.outbox if APPROVED in m.subject]


def _age(minutes: float = 2) -> None:
    """Rows written ``minutes`` ago (beat only resends rows older than a minute)."""
    NotificationOutbox.objects.update(created_at=timezone.now() - timedelta(minutes=minutes))


def test_an_approved_email_queued_during_an_outage_is_sent_once_the_broker_is_back(
    synced, awaiting_review, reviewer, broker, django_capture_on_commit_callbacks
):
    req = awaiting_review(synced[0])
    mail.outbox.clear()
    broker.down()
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    req.refresh_from_db()
    assert req.status == "approved"
    assert _approved_mails() == []  # nothing could be queued
    row = NotificationOutbox.objects.get(request=req, event="approved")
    assert row.status == Outbox.PENDING

    broker.up()
    assert notifications.notifications_resend() == []  # not a minute old yet: its task may run
    _age()
    assert tasks.resend_notifications.delay().get() == 1
    assert len(_approved_mails()) == 1 and _approved_mails()[0].to == ["alice@example.com"]
    row.refresh_from_db()
    assert row.status == Outbox.SENT and row.sent_at is not None and row.messages == 1
    # Beat again, and the task that finally arrives late: no second e-mail.
    assert tasks.resend_notifications.delay().get() == 0
    assert tasks.send_request_notification.delay(req.pk, "approved").get() == 0
    assert len(_approved_mails()) == 1


def test_with_the_broker_up_the_task_sends_at_commit_and_marks_sent(
    synced, awaiting_review, reviewer, django_capture_on_commit_callbacks
):
    req = awaiting_review(synced[0])
    mail.outbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    assert len(_approved_mails()) == 1
    assert NotificationOutbox.objects.get(request=req, event="approved").status == Outbox.SENT
    _age()
    assert notifications.notifications_resend() == []
    assert len(_approved_mails()) == 1


def test_the_outbox_row_is_written_in_the_transaction_of_the_state_change(
    synced, awaiting_review, reviewer
):
    req = awaiting_review(synced[0])
    before = NotificationOutbox.objects.count()
    with pytest.raises(RuntimeError), transaction.atomic():
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
        assert NotificationOutbox.objects.filter(request=req, event="approved").exists()
        raise RuntimeError("the state change is rolled back")
    assert NotificationOutbox.objects.count() == before


def test_a_row_leased_by_another_worker_is_not_sent_twice(
    synced, awaiting_review, reviewer, broker, django_capture_on_commit_callbacks
):
    req = awaiting_review(synced[0])
    broker.down()
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    broker.up()
    row = NotificationOutbox.objects.get(request=req, event="approved")
    mail.outbox.clear()
    other = leases.new_holder()
    assert leases.lease_acquire(
        name=f"notification:{row.pk}", holder=other, ttl=timedelta(minutes=5)
    )
    _age()
    notifications.notifications_resend()
    assert _approved_mails() == []  # the other worker is sending it
    row.refresh_from_db()
    assert row.status == Outbox.PENDING and row.attempts == 0
    # That worker died: its lease lapses, and the next beat sends the row.
    from portal.models import Lease

    Lease.objects.filter(holder=other).update(expires_at=timezone.now() - timedelta(seconds=1))
    notifications.notifications_resend()
    assert len(_approved_mails()) == 1


def test_failed_sends_are_retried_a_bounded_number_of_times_then_marked_failed(
    synced,
    awaiting_review,
    reviewer,
    settings,
    monkeypatch,
    caplog,
    django_capture_on_commit_callbacks,
):
    settings.NOTIFICATION_MAX_ATTEMPTS = 3
    req = awaiting_review(synced[0])

    def smtp_down(*args, **kwargs):
        raise ConnectionRefusedError("smtp: connection refused")

    monkeypatch.setattr(notifications, "send_mass_mail", smtp_down)
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    row = NotificationOutbox.objects.get(request=req, event="approved")
    assert row.status == Outbox.PENDING and row.attempts == 1
    assert "connection refused" in row.last_error
    for _ in range(4):
        _age()
        NotificationOutbox.objects.update(last_attempt_at=timezone.now() - timedelta(minutes=2))
        notifications.notifications_resend()
    row.refresh_from_db()
    assert row.status == Outbox.FAILED and row.attempts == 3
    assert "ConnectionRefusedError" in row.last_error
    assert "attempt 3 of 3" in caplog.text


def test_resend_is_on_the_beat_schedule(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["resend-notifications"]
    assert entry["task"] == "rollouts.tasks.resend_notifications"


# --- alerts -----------------------------------------------------------------------------------


def _fired_alert(world, capture):  # noqa: F811
    _rule(world["endpoint"], "error_rate", 0.05)
    _rollup(world["endpoint"], world["v2"], requests=50, errors=50)
    return _evaluate(capture)


def test_an_alert_is_marked_notified_only_after_its_email_was_sent(
    world,  # noqa: F811
    data_scientist,
    manager,
    monkeypatch,
    broker,
    django_capture_on_commit_callbacks,
):
    broker.down()
    result = _fired_alert(world, django_capture_on_commit_callbacks)  # e-mail not queued
    broker.up()
    alert_id = result.fired[0]
    assert Alert.objects.get(pk=alert_id).notified_at is None
    seen = []
    real = alerts.send_mass_mail

    def sending(messages, **kwargs):
        # A worker that dies here must leave the alert unsent, to be sent again.
        seen.append(Alert.objects.get(pk=alert_id).notified_at)
        # A second worker asked to send it meanwhile sends nothing.
        seen.append(alerts.alert_notify(alert_id=alert_id))
        return real(messages, **kwargs)

    monkeypatch.setattr(alerts, "send_mass_mail", sending)
    mail.outbox.clear()
    assert alerts.alert_notify(alert_id=alert_id) == 2
    assert seen == [None, 0]
    assert Alert.objects.get(pk=alert_id).notified_at is not None
    assert alerts.alert_notify(alert_id=alert_id) == 0
    assert len(mail.outbox) == 2


def test_an_alert_whose_send_failed_stays_unsent_and_the_next_evaluation_sends_it(
    world,  # noqa: F811
    data_scientist,
    manager,
    monkeypatch,
    django_capture_on_commit_callbacks,
):
    real = alerts.send_mass_mail
    monkeypatch.setattr(
        alerts, "send_mass_mail", lambda *a, **k: (_ for _ in ()).throw(OSError("smtp down"))
    )
    with pytest.raises((OSError, Retry)):  # the task retries an OSError (eager: raised)
        _fired_alert(world, django_capture_on_commit_callbacks)
    assert Alert.objects.get().notified_at is None
    monkeypatch.setattr(alerts, "send_mass_mail", real)
    mail.outbox.clear()
    _evaluate(django_capture_on_commit_callbacks)
    assert len(mail.outbox) == 2 and Alert.objects.get().notified_at is not None

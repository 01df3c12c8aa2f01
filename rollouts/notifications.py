"""E-mails about deployment requests, through Django's e-mail backend (the console in the demo).

Reviewers hear when a request awaits them; the requester hears of every decision and outcome.

Every e-mail goes through a transactional outbox (:class:`rollouts.models.NotificationOutbox`,
issue 9): :func:`notification_record` writes the row in the transaction of the state change and
queues ``rollouts.tasks.send_request_notification`` on commit; :func:`notification_deliver`
sends a row and marks it sent. When the broker is down at commit, nothing is queued, and beat's
``rollouts.tasks.resend_notifications`` (:func:`notifications_resend`) sends the rows still
pending a minute later. Each send holds a lease on its row (:mod:`portal.leases`), so two
workers never send the same row at once; a sent row is never sent again. Delivery is at least
once: a worker that dies after the mail server accepted a message but before the row was marked
sent leaves it pending, and it is sent again once its lease lapses.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import send_mass_mail
from django.utils import timezone

from portal import leases
from rollouts.models import DeploymentRequest, NotificationOutbox

logger = logging.getLogger(__name__)

Outbox = NotificationOutbox.Status
#: How long one send may hold its row's lease; a worker that died lets it lapse after this.
SEND_LEASE = timedelta(minutes=5)

REQUESTER_EVENTS = {
    "gates_failed": "failed its automated gates",
    "approved": "was approved and is being deployed",
    "rejected": "was rejected",
    "live": "is live",
    "failed": "failed to deploy",
    "expired": "expired without a decision",
    "rolled_back": "was rolled back",
}


def _reviewers(req: DeploymentRequest) -> list[str]:
    from rollouts.services import approver_group_name

    group = approver_group_name(req.endpoint.environment)
    return list(
        User.objects.filter(groups__name=group, is_active=True)
        .exclude(pk=req.requester_id)
        .exclude(email="")
        .values_list("email", flat=True)
        .distinct()
    )


def send(*, request_id: int, event: str) -> int:
    """Send the messages for ``event`` ("awaiting_review" or a key of ``REQUESTER_EVENTS``).

    Returns the number of messages sent; 0 for an unknown request, event or no recipient.
    """
    req = (
        DeploymentRequest.objects.select_related(
            "model_version__registered_model", "endpoint__environment", "requester"
        )
        .filter(pk=request_id)
        .first()
    )
    if req is None:
        return 0
    link = f"{settings.SITE_URL.rstrip('/')}{req.get_absolute_url()}"
    what = f"{req.model_version} to {req.endpoint.environment.name}"
    if event == "awaiting_review":
        recipients = _reviewers(req)
        subject = f"[Rollgate] Review requested: {what}"
        body = (
            f"{req.requester.get_username()} asks to deploy {what}.\n\n"
            f"Justification: {req.justification}\n\nThe gates passed. Review it at {link}\n"
        )
        messages = [
            (subject, body, settings.DEFAULT_FROM_EMAIL, [address]) for address in recipients
        ]
    elif event in REQUESTER_EVENTS and req.requester.email:
        subject = f"[Rollgate] Request #{req.pk} {REQUESTER_EVENTS[event]}: {what}"
        reason = f"\n\n{req.status_reason}" if req.status_reason else ""
        body = f"Your request #{req.pk} to deploy {what} {REQUESTER_EVENTS[event]}.{reason}\n\n{link}\n"
        messages = [(subject, body, settings.DEFAULT_FROM_EMAIL, [req.requester.email])]
    else:
        return 0
    return send_mass_mail(messages, fail_silently=False) if messages else 0


def notification_record(*, request_id: int, event: str) -> NotificationOutbox:
    """Owe the e-mails of ``event`` about request ``request_id``: an outbox row, written in the
    caller's transaction (so it exists exactly when the state change does), and the send task
    queued when that transaction commits. A broker that cannot be reached then is logged, not
    raised (:mod:`portal.tasking`); beat sends the row later."""
    from portal.tasking import enqueue_on_commit
    from rollouts import tasks

    row = NotificationOutbox.objects.create(request_id=request_id, event=event)
    enqueue_on_commit(tasks.send_request_notification, request_id, event)
    return row


def notification_deliver(*, outbox_id: int) -> int:
    """Send one outbox row unless it is sent, failed, or being sent by another worker (its
    lease); returns the number of e-mails sent (0 when there was nothing to do).

    On success the row is ``sent``. A failed send counts an attempt and keeps the error; after
    ``NOTIFICATION_MAX_ATTEMPTS`` the row is ``failed`` for good. Never raises what the mail
    backend raises: the next try is beat's, a minute later."""
    name = f"notification:{outbox_id}"
    holder = leases.new_holder()
    if not leases.lease_acquire(name=name, holder=holder, ttl=SEND_LEASE):
        return 0
    try:
        row = NotificationOutbox.objects.filter(pk=outbox_id, status=Outbox.PENDING).first()
        if row is None:
            return 0
        now = timezone.now()
        try:
            sent = send(request_id=row.request_id, event=row.event)
        except Exception as exc:  # noqa: BLE001 - any failure of the mail backend is an attempt
            attempts = row.attempts + 1
            failed = attempts >= settings.NOTIFICATION_MAX_ATTEMPTS
            NotificationOutbox.objects.filter(pk=row.pk, status=Outbox.PENDING).update(
                attempts=attempts,
                last_error=f"{type(exc).__name__}: {exc}"[:2000],
                last_attempt_at=now,
                status=Outbox.FAILED if failed else Outbox.PENDING,
            )
            log = logger.error if failed else logger.warning
            log(
                "notification #%s (%s of request #%s) failed, attempt %s of %s: %s",
                row.pk,
                row.event,
                row.request_id,
                attempts,
                settings.NOTIFICATION_MAX_ATTEMPTS,
                exc,
            )
            return 0
        NotificationOutbox.objects.filter(pk=row.pk, status=Outbox.PENDING).update(
            status=Outbox.SENT, sent_at=timezone.now(), last_attempt_at=now, messages=sent
        )
        return sent
    finally:
        leases.lease_release(name=name, holder=holder)


def notifications_deliver_for(*, request_id: int, event: str) -> int:
    """Send the pending outbox rows of ``event`` about ``request_id`` (what the queued task
    carries); returns the e-mails sent."""
    ids = NotificationOutbox.objects.filter(
        request_id=request_id, event=event, status=Outbox.PENDING
    ).values_list("pk", flat=True)
    return sum(notification_deliver(outbox_id=pk) for pk in list(ids))


def notifications_resend(*, older_than: timedelta | None = None) -> list[int]:
    """Periodic (beat): send the rows still pending ``older_than`` after they were written and
    after their last failed attempt (default ``NOTIFICATION_RESEND_AFTER_S``): their task never
    reached a worker (broker down), or their send failed. Returns the ids tried."""
    if older_than is None:
        older_than = timedelta(seconds=settings.NOTIFICATION_RESEND_AFTER_S)
    cutoff = timezone.now() - older_than
    due = list(
        NotificationOutbox.objects.filter(status=Outbox.PENDING, created_at__lt=cutoff)
        .exclude(last_attempt_at__gte=cutoff)
        .values_list("pk", flat=True)[:500]
    )
    for pk in due:  # no transaction around a send: slow I/O, and each row stands alone
        notification_deliver(outbox_id=pk)
    return due

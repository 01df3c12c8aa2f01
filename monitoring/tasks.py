"""Thin Celery tasks of the monitoring app, run by beat."""

from __future__ import annotations

from datetime import timedelta

from celery import shared_task

from monitoring import rollups
from portal.leases import leased

#: One refresh at a time across workers (a lease in the database, seen by every worker); a run
#: that outlives this is assumed dead and its lease lapses.
REFRESH_LOCK_S = 600


@shared_task
def refresh_rollups() -> dict[str, int]:
    """Periodic (beat): recompute the stale hours, their days and their drift."""
    with leased("monitoring:refresh-rollups", ttl=timedelta(seconds=REFRESH_LOCK_S)) as held:
        if not held:
            return {"skipped": 1}
        result = rollups.rollups_refresh()
    return {"hours": result.hours, "days": result.days, "drift_windows": result.drift_windows}


#: One evaluation at a time across workers (a database lease); a run that outlives this is
#: assumed dead.
ALERT_LOCK_S = 300


@shared_task
def evaluate_alerts() -> dict[str, int]:
    """Periodic (beat, ``ALERT_EVALUATION_S``): evaluate the alert rules on the rollups, run
    pending actions, queue pending e-mails. Reads rollups as ``refresh_rollups`` last left
    them (see :mod:`monitoring.alerts`). Idempotent."""
    from monitoring import alerts

    with leased("monitoring:evaluate-alerts", ttl=timedelta(seconds=ALERT_LOCK_S)) as held:
        if not held:
            return {"skipped": 1}
        return alerts.alerts_evaluate().as_dict()


@shared_task
def reclaim_alert_actions() -> int:
    """Periodic (beat, ``ALERT_ACTION_RECLAIM_S``): run again the alert actions whose worker
    died (left running past ``ALERT_ACTION_LEASE_S``), or fail them after
    ``ALERT_ACTION_MAX_ATTEMPTS``; see ``monitoring.alerts.alert_actions_reclaim``."""
    from monitoring import alerts

    return len(alerts.alert_actions_reclaim())


@shared_task(autoretry_for=(OSError,), retry_backoff=10, max_retries=3)
def send_alert_notification(alert_id: int) -> int:
    """E-mail an alert to its endpoint's team and the managers, once; returns messages sent."""
    from monitoring import alerts

    return alerts.alert_notify(alert_id=alert_id)


@shared_task
def match_pending_feedback() -> dict[str, int]:
    """Periodic (beat, ``FEEDBACK_PENDING_MATCH_S``): store pending labels whose prediction rows
    were written meanwhile (those the log writer's own match missed, e.g. a label that arrived
    while its row was being flushed) and drop expired ones. Idempotent; concurrent runs skip
    each other's rows (row locks)."""
    from monitoring import services

    result = services.pending_feedback_match(everything=True)
    return {"accepted": result.accepted, "pending": result.pending}

"""Thin Celery tasks: they take ids and call one service."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from registry.mlflow_client import RegistryError
from rollouts import notifications, services
from rollouts.models import DeploymentRequest

logger = logging.getLogger(__name__)


@shared_task(acks_late=True)
def run_gates(request_id: int) -> str | None:
    """Run the automated gates of a pending request; returns its status afterwards."""
    try:
        return services.deployment_request_run_gates(request_id=request_id).status
    except DeploymentRequest.DoesNotExist:
        logger.warning("run_gates: request #%s does not exist; nothing to do", request_id)
        return None


@shared_task(
    autoretry_for=(RegistryError,),
    retry_backoff=2,
    max_retries=5,
    acks_late=True,
    reject_on_worker_lost=True,
    time_limit=settings.DEPLOY_TIME_LIMIT_S,
    soft_time_limit=max(settings.DEPLOY_TIME_LIMIT_S - 15, 1),
)
def execute_deployment(request_id: int) -> str | None:
    """Launch the deployment of an approved request; returns the request's final status."""
    try:
        req = services.deployment_execute(request_id=request_id)
    except DeploymentRequest.DoesNotExist:
        logger.warning("execute_deployment: request #%s does not exist; nothing to do", request_id)
        return None
    return req.status


@shared_task
def expire_requests() -> int:
    """Periodic (Celery beat): expire requests not decided within their environment's limit."""
    return len(services.deployment_requests_expire())


@shared_task
def redispatch_stalled() -> int:
    """Periodic (beat): queue again gates and deployments whose task never reached a worker
    (the broker was down when they were requested), and deployments whose worker died (their
    lease in the database lapsed); see ``services.deployment_requests_redispatch``."""
    return len(services.deployment_requests_redispatch())


@shared_task
def send_request_notification(request_id: int, event: str) -> int:
    """E-mail the people an event concerns (its outbox rows, sent once); returns how many
    messages were sent. A failed send is retried by ``resend_notifications``, not here."""
    return notifications.notifications_deliver_for(request_id=request_id, event=event)


@shared_task
def resend_notifications() -> int:
    """Periodic (beat, ``NOTIFICATION_RESEND_S``): send the notifications still unsent a
    minute after they were recorded (the broker was down, or the mail server failed)."""
    return len(notifications.notifications_resend())


@shared_task(acks_late=True, time_limit=300, soft_time_limit=240)
def advance_rollout(rollout_id: int) -> str | None:
    """Judge a rollout's step in progress when it is due, and act on the verdict; returns the
    rollout's state afterwards (``rollouts.executor.rollout_advance``)."""
    from rollouts.executor import rollout_advance
    from rollouts.models import Rollout

    try:
        return rollout_advance(rollout_id=rollout_id).state
    except Rollout.DoesNotExist:
        logger.warning("advance_rollout: rollout #%s does not exist; nothing to do", rollout_id)
        return None


@shared_task
def advance_rollouts() -> int:
    """Periodic (beat, ``ROLLOUT_CHECK_S``): send every rollout whose step is due and whose
    claim is free or lapsed (its worker died); returns how many were sent."""
    from portal.tasking import enqueue
    from rollouts.executor import rollouts_due

    return sum(1 for pk in rollouts_due() if enqueue(advance_rollout, pk))

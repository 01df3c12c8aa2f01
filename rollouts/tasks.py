"""Thin Celery tasks: they take ids and call one service."""

from __future__ import annotations

import logging

from celery import shared_task

from registry.mlflow_client import RegistryError
from rollouts import services
from rollouts.models import DeploymentRequest

logger = logging.getLogger(__name__)


@shared_task(autoretry_for=(RegistryError,), retry_backoff=2, max_retries=5, acks_late=True)
def execute_deployment(request_id: int) -> str | None:
    """Launch the deployment of an approved request; returns the request's final status."""
    try:
        req = services.deployment_execute(request_id=request_id)
    except DeploymentRequest.DoesNotExist:
        logger.warning("execute_deployment: request #%s does not exist; nothing to do", request_id)
        return None
    return req.status

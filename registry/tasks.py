from __future__ import annotations

import logging

from celery import shared_task

from registry import mlflow_client, services

logger = logging.getLogger(__name__)


@shared_task(
    autoretry_for=(mlflow_client.RegistryError,), retry_backoff=5, max_retries=3, acks_late=True
)
def sync_registry(actor_id: int | None = None) -> dict[str, int]:
    """Mirror the MLflow registry (periodic fallback and the "Sync now" button)."""
    from django.contrib.auth.models import User

    actor = User.objects.filter(pk=actor_id).first() if actor_id else None
    result = services.registry_sync(actor=actor)
    logger.info("registry sync: %s", result)
    return result.__dict__

"""Thin Celery tasks of the monitoring app, run by beat."""

from __future__ import annotations

from celery import shared_task
from django.core.cache import cache

from monitoring import rollups

#: One refresh at a time across workers; a run that outlives this is assumed dead.
REFRESH_LOCK_S = 600


@shared_task
def refresh_rollups() -> dict[str, int]:
    """Periodic (beat): recompute the stale hours, their days and their drift."""
    if not cache.add("rollgate:refresh-rollups", 1, timeout=REFRESH_LOCK_S):
        return {"skipped": 1}
    try:
        result = rollups.rollups_refresh()
    finally:
        cache.delete("rollgate:refresh-rollups")
    return {"hours": result.hours, "days": result.days, "drift_windows": result.drift_windows}

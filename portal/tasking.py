"""Queueing Celery tasks from a web request without failing the request.

What a request changed is committed before its task is queued (``transaction.on_commit``), so a
broker that is down cannot undo it; it must not turn the answer into a 500 either. The task is
then left unqueued and logged; ``rollouts.tasks.redispatch_stalled`` (beat) queues the work of
requests that waited too long, once the broker answers again.
"""

from __future__ import annotations

import logging
from typing import Any

from django.db import transaction
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)

#: What publishing raises when the broker cannot be reached.
BROKER_ERRORS = (OperationalError, ConnectionError, TimeoutError)


def enqueue(task: Any, *args: Any) -> bool:
    """``task.delay(*args)`` now; False (logged) when the broker cannot be reached."""
    try:
        task.delay(*args)
    except BROKER_ERRORS as exc:
        logger.error("could not queue %s%r: %s; it will be retried", task.name, args, exc)
        return False
    return True


def enqueue_on_commit(task: Any, *args: Any) -> None:
    """:func:`enqueue` once the current transaction commits."""
    transaction.on_commit(lambda: enqueue(task, *args))

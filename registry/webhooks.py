"""Receiver of MLflow's model-registry webhooks: verify the delivery, then queue a registry sync.

MLflow 3.17 (``mlflow/webhooks/delivery.py``) POSTs a JSON body
``{"entity": str, "action": str, "timestamp": ISO-8601 str, "data": {...}}`` with the headers

- ``X-MLflow-Delivery-Id``: a UUID, new for every delivery;
- ``X-MLflow-Timestamp``: Unix time of sending, in whole seconds;
- ``X-MLflow-Signature``: ``v1,`` + base64 of HMAC-SHA256, keyed with the webhook's secret, over
  ``{delivery_id}.{timestamp}.{body}`` (the body exactly as sent, UTF-8).

The delivery's ``data`` is not written anywhere: an accepted delivery only queues
``registry.tasks.sync_registry``, which re-reads MLflow (the source of truth) and is idempotent.
So a duplicated, reordered or replayed delivery at worst costs one extra sync, which is why
replay protection is a timestamp window and not a table of seen delivery ids.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Mapping

from django.conf import settings
from django.db import transaction
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from portal.inputs import BadInput, loads_bounded
from portal.tasking import enqueue
from registry import tasks
from registry.mlflow_client import REGISTRY_WEBHOOK_EVENTS

logger = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_ID_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
# How far a delivery's timestamp may be from our clock, in seconds (either way: a timestamp in
# the future is as suspicious as an old one). Standard Webhooks uses the same 5 minutes.
TIMESTAMP_TOLERANCE_S = 300


class DeliveryRejected(Exception):
    """A delivery the portal will not act on; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def delivery_signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """The ``X-MLflow-Signature`` value MLflow sends: ``"v1,<base64 HMAC-SHA256>"`` over
    ``{delivery_id}.{timestamp}.{body}``, keyed with ``secret`` (all UTF-8)."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify_delivery(
    *, secret: str, headers: Mapping[str, str], body: bytes, now: float | None = None
) -> str:
    """Check a delivery's signature and timestamp; returns its delivery id.

    ``headers`` is a case-insensitive mapping (``request.headers``). The signature header may
    hold several space-separated ``v1,<sig>`` entries (Standard Webhooks style, for secret
    rotation); one match is enough. ``now`` is Unix seconds (default: the clock).

    Raises:
        DeliveryRejected(401): a header is missing or malformed, no signature matches, or the
            timestamp is more than ``TIMESTAMP_TOLERANCE_S`` seconds away from ``now``.
    """
    delivery_id = headers.get(DELIVERY_ID_HEADER, "")
    timestamp = headers.get(TIMESTAMP_HEADER, "")
    received = headers.get(SIGNATURE_HEADER, "")
    if not (delivery_id and timestamp and received):
        raise DeliveryRejected(
            401, f"missing {SIGNATURE_HEADER}, {TIMESTAMP_HEADER} or {DELIVERY_ID_HEADER} header"
        )
    if not (timestamp.isascii() and timestamp.isdigit()):
        raise DeliveryRejected(401, f"{TIMESTAMP_HEADER} must be Unix seconds")
    expected = delivery_signature(secret, delivery_id, timestamp, body).encode()
    # Compare every candidate, as bytes: compare_digest refuses non-ASCII str, and a header may
    # carry anything.
    matches = [hmac.compare_digest(expected, candidate.encode()) for candidate in received.split()]
    if not any(matches):
        raise DeliveryRejected(401, "invalid signature")
    age = (time.time() if now is None else now) - int(timestamp)
    if abs(age) > TIMESTAMP_TOLERANCE_S:
        raise DeliveryRejected(
            401, f"timestamp is {age:+.0f}s from now; at most {TIMESTAMP_TOLERANCE_S}s accepted"
        )
    return delivery_id


def delivery_event(body: bytes) -> str:
    """The event of a delivery body, as ``"<entity>.<action>"`` (e.g. ``"model_version.created"``).

    Raises:
        DeliveryRejected(400): the body is not a JSON object with string ``entity`` and
            ``action`` (nested at most ``API_JSON_MAX_DEPTH`` levels, no NUL in its strings),
            or the event is not one of ``REGISTRY_WEBHOOK_EVENTS``.
    """
    try:
        payload = loads_bounded(body)
    except BadInput as exc:
        raise DeliveryRejected(400, f"body refused: {exc}") from None
    if not isinstance(payload, dict):
        raise DeliveryRejected(400, "body must be a JSON object")
    entity, action = payload.get("entity"), payload.get("action")
    if not (isinstance(entity, str) and isinstance(action, str)):
        raise DeliveryRejected(400, "body must have string fields 'entity' and 'action'")
    event = f"{entity}.{action}"
    if event not in REGISTRY_WEBHOOK_EVENTS:
        raise DeliveryRejected(
            400, f"unknown event type {event!r}; accepted: {', '.join(REGISTRY_WEBHOOK_EVENTS)}"
        )
    return event


def _enqueue_sync() -> None:
    enqueue(tasks.sync_registry)  # a lost delivery is caught up by the periodic sync


@csrf_exempt  # MLflow cannot hold a CSRF token; the HMAC signature authenticates the caller
@require_POST
def mlflow_webhook(request: HttpRequest) -> JsonResponse:
    """``POST /registry/webhooks/mlflow``: one MLflow registry webhook delivery.

    Answers 202 ``{"status": "accepted"}`` and queues ``sync_registry`` after commit; otherwise
    ``{"detail": <reason>}`` with 503 (``MLFLOW_WEBHOOK_SECRET`` unset), 401 (signature or
    timestamp) or 400 (body or event type), and nothing is queued or written.
    """
    secret = settings.MLFLOW_WEBHOOK_SECRET
    if not secret:
        return JsonResponse({"detail": "webhooks not configured"}, status=503)
    body = request.body
    try:
        # The signature is checked before the body is parsed, so unauthenticated callers learn
        # nothing about what the endpoint accepts.
        delivery_id = verify_delivery(secret=secret, headers=request.headers, body=body)
        event = delivery_event(body)
    except DeliveryRejected as exc:
        logger.warning("MLflow webhook delivery rejected (%s): %s", exc.status, exc)
        return JsonResponse({"detail": str(exc)}, status=exc.status)
    logger.info("MLflow webhook %s (delivery %s): registry sync queued", event, delivery_id)
    transaction.on_commit(_enqueue_sync)
    return JsonResponse({"status": "accepted"}, status=202)

"""Write and verify the hash-chained audit log.

Every state change in Rollgate calls :func:`audit_record` inside the transaction that makes the
change, so that the event exists exactly when the change does.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from django.contrib.auth.models import AnonymousUser, User
from django.db import models, transaction
from django.utils import timezone

from portal.models import AuditChainHead, AuditEvent

GENESIS_HASH = "0" * 64


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so the hashed value is exactly what the database stores."""
    return json.loads(json.dumps(value, default=str)) if value is not None else None


def event_hash(event: AuditEvent) -> str:
    """sha256 hex of ``prev_hash`` followed by the canonical JSON of the event's fields."""
    body = {
        "created_at": event.created_at.isoformat(),
        "actor_id": event.actor_id,
        "actor_label": event.actor_label,
        "action": event.action,
        "object_type": event.object_type,
        "object_id": event.object_id,
        "object_repr": event.object_repr,
        "registered_model": event.registered_model,
        "environment": event.environment,
        "before": event.before,
        "after": event.after,
    }
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256((event.prev_hash + canonical).encode()).hexdigest()


@transaction.atomic
def audit_record(
    *,
    actor: User | AnonymousUser | None,
    action: str,
    obj: models.Model | None = None,
    target: tuple[str, str, str] | None = None,
    registered_model: str = "",
    environment: str = "",
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain. ``actor`` None (or anonymous) is recorded as ``system``.

    The object is ``obj`` (a saved model instance) or ``target`` = (type, id, repr) for things
    that are not rows, such as a whole-registry sync. ``registered_model`` and ``environment``
    name what the event concerns, for filtering the trail.

    Locks the chain head row, so concurrent callers append one after another.
    """
    if obj is not None:
        object_type, object_id, object_repr = obj._meta.label, str(obj.pk), str(obj)
    elif target is not None:
        object_type, object_id, object_repr = target
    else:
        raise ValueError("audit_record needs obj or target")
    head, _ = AuditChainHead.objects.select_for_update().get_or_create(pk=1)
    user = actor if actor is not None and actor.is_authenticated else None
    event = AuditEvent(
        created_at=timezone.now(),
        actor=user,
        actor_label=user.get_username() if user else "system",
        action=action,
        object_type=object_type,
        object_id=object_id,
        object_repr=object_repr[:255],
        registered_model=registered_model,
        environment=environment,
        before=_jsonable(before),
        after=_jsonable(after),
        prev_hash=head.last_hash,
    )
    event.hash = event_hash(event)
    event.save()
    head.last_hash = event.hash
    head.length += 1
    head.save(update_fields=["last_hash", "length"])
    return event


@dataclass(frozen=True)
class ChainReport:
    intact: bool
    checked: int
    broken_event_id: int | None = None
    reason: str = ""


def audit_verify() -> ChainReport:
    """Walk the chain in id order; report the first event whose link or hash does not hold.

    Detects an edited row (its hash no longer matches), a deleted row (the next row's
    ``prev_hash`` points at nothing) and a removed tail (the head records more events).
    """
    expected_prev = GENESIS_HASH
    previous_id: int | None = None
    checked = 0
    for event in AuditEvent.objects.order_by("id").iterator(chunk_size=2000):
        if event.prev_hash != expected_prev:
            # Name the gap, so a reader knows where a removed event was.
            after = f"#{previous_id}" if previous_id is not None else "the start of the chain"
            return ChainReport(
                False,
                checked,
                event.pk,
                f"the event before it (after {after}) is missing or altered",
            )
        if event_hash(event) != event.hash:
            return ChainReport(False, checked, event.pk, "event fields altered")
        expected_prev = event.hash
        previous_id = event.pk
        checked += 1
    head = AuditChainHead.objects.filter(pk=1).first()
    if head is None:
        # The head is created by a migration and never deleted; without it a removed tail
        # would go unnoticed, so its absence is itself a break (unless nothing was recorded).
        if checked:
            return ChainReport(False, checked, None, "the chain head record is missing")
        return ChainReport(True, checked)
    if head.length != checked or head.last_hash != expected_prev:
        return ChainReport(False, checked, None, "events removed from the end of the chain")
    return ChainReport(True, checked)

"""Writes of the monitoring app: ground truth."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from monitoring.models import GroundTruth
from rollouts.models import PredictionLog


@dataclass(frozen=True)
class FeedbackItem:
    request_id: uuid.UUID
    label: Any
    row: int | None = None


@dataclass
class FeedbackResult:
    accepted: int = 0
    unknown: list[str] = field(default_factory=list)


def feedback_record(
    *, items: list[FeedbackItem], endpoint_ids: frozenset[int] | None = None
) -> FeedbackResult:
    """Attach labels to logged predictions by request id.

    A one-row request takes ``label`` as is; a request of k rows takes either ``row`` (which row)
    or a list of k labels. Ids that match no prediction (or none on ``endpoint_ids``, when an API
    key limits them) are returned in ``unknown`` and the rest are stored. A label sent again
    replaces the earlier one.

    Raises:
        ValidationError: an item addresses a row that does not exist, or a multi-row request
            without ``row``; nothing is stored.
    """
    wanted = {item.request_id for item in items}
    rows = PredictionLog.objects.filter(request_id__in=wanted)
    if endpoint_ids is not None:
        rows = rows.filter(endpoint_id__in=endpoint_ids)
    by_request: dict[uuid.UUID, dict[int, int]] = {}
    for pk, request_id, row_index in rows.values_list("pk", "request_id", "row_index"):
        by_request.setdefault(request_id, {})[row_index] = pk

    labels: dict[int, Any] = {}
    errors: dict[str, str] = {}
    result = FeedbackResult()
    for i, item in enumerate(items):
        logged = by_request.get(item.request_id)
        if logged is None:
            result.unknown.append(str(item.request_id))
            continue
        if item.row is not None:
            if item.row not in logged:
                errors[f"[{i}].row"] = f"request {item.request_id} has no row {item.row}."
                continue
            labels[logged[item.row]] = item.label
        elif len(logged) == 1:
            labels[next(iter(logged.values()))] = item.label
        elif isinstance(item.label, list) and len(item.label) == len(logged):
            for row_index, label in enumerate(item.label):
                labels[logged[row_index]] = label
        else:
            errors[f"[{i}].label"] = (
                f"request {item.request_id} scored {len(logged)} rows: send 'row' or a list of "
                f"{len(logged)} labels."
            )
    if errors:
        raise ValidationError(errors)
    now = timezone.now()
    with transaction.atomic():
        GroundTruth.objects.bulk_create(
            [
                GroundTruth(prediction_id=pk, label=label, received_at=now)
                for pk, label in labels.items()
            ],
            update_conflicts=True,
            unique_fields=["prediction"],
            update_fields=["label", "received_at"],
        )
    result.accepted = len(labels)
    return result

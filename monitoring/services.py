"""Writes of the monitoring app: ground truth and drift baselines."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from monitoring import drift
from monitoring.models import DriftBaseline, DriftSettings, Granularity, GroundTruth, Rollup
from monitoring.rollups import windows_mark_stale
from portal.audit import audit_record
from portal.roles import can_request_deployment, is_platform_admin
from registry.models import ModelVersion
from rollouts.models import Endpoint, PredictionLog


@dataclass(frozen=True)
class FeedbackItem:
    """A label for a logged request, named by Rollgate's ``request_id`` (``X-Request-Id``) or
    by the client's own ``inference_id`` (the ``X-Inference-Id`` it sent); exactly one."""

    label: Any
    request_id: uuid.UUID | None = None
    inference_id: str | None = None
    row: int | None = None

    @property
    def ref(self) -> str:
        return str(self.request_id) if self.request_id is not None else str(self.inference_id)


@dataclass
class FeedbackResult:
    accepted: int = 0
    unknown: list[str] = field(default_factory=list)


def feedback_record(
    *, items: list[FeedbackItem], endpoint_ids: frozenset[int] | None = None
) -> FeedbackResult:
    """Attach labels to logged predictions by request id or by the client's inference id.

    An inference id that names several requests labels the most recent one. A one-row request
    takes ``label`` as is; a request of k rows takes either ``row`` (which row) or a list of k
    labels. Ids that match no prediction (or none on ``endpoint_ids``, when an API
    key limits them) are returned in ``unknown`` and the rest are stored. A label sent again
    replaces the earlier one.

    Raises:
        ValidationError: an item addresses a row that does not exist, or a multi-row request
            without ``row``; nothing is stored.
    """
    by_request = _logged_rows(items, endpoint_ids)

    labels: dict[int, Any] = {}
    errors: dict[str, str] = {}
    result = FeedbackResult()
    for i, item in enumerate(items):
        logged = by_request.get(item.ref)
        if logged is None:
            result.unknown.append(item.ref)
            continue
        if item.row is not None:
            if item.row not in logged:
                errors[f"[{i}].row"] = f"request {item.ref} has no row {item.row}."
                continue
            labels[logged[item.row]] = item.label
        elif len(logged) == 1:
            labels[next(iter(logged.values()))] = item.label
        elif isinstance(item.label, list) and len(item.label) == len(logged):
            for row_index, label in enumerate(item.label):
                labels[logged[row_index]] = label
        else:
            errors[f"[{i}].label"] = (
                f"request {item.ref} scored {len(logged)} rows: send 'row' or a list of "
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
        # The windows these predictions belong to are rolled up again with their labels.
        windows_mark_stale(
            PredictionLog.objects.filter(pk__in=list(labels))
            .values_list("endpoint_id", "model_version_id", "created_at")
            .distinct()
        )
    result.accepted = len(labels)
    return result


def _logged_rows(
    items: list[FeedbackItem], endpoint_ids: frozenset[int] | None
) -> dict[str, dict[int, int]]:
    """``{item.ref: {row_index: prediction pk}}`` for the items' logged requests."""
    by_ref: dict[str, dict[int, int]] = {}
    request_ids = {item.request_id for item in items if item.request_id is not None}
    inference_ids = {item.inference_id for item in items if item.request_id is None}
    scope = PredictionLog.objects.all()
    if endpoint_ids is not None:
        scope = scope.filter(endpoint_id__in=endpoint_ids)
    if request_ids:
        rows = scope.filter(request_id__in=request_ids)
        for pk, request_id, row_index in rows.values_list("pk", "request_id", "row_index"):
            by_ref.setdefault(str(request_id), {})[row_index] = pk
    if inference_ids:
        rows = scope.filter(inference_id__in=inference_ids).order_by("created_at", "pk")
        latest: dict[str, Any] = {}
        for pk, inference_id, request_id, row_index in rows.values_list(
            "pk", "inference_id", "request_id", "row_index"
        ):
            if latest.get(inference_id) != request_id:  # a later request replaces an earlier
                latest[inference_id] = request_id
                by_ref[inference_id] = {}
            by_ref[inference_id][row_index] = pk
    return by_ref


def drift_baseline_set(
    *,
    actor: User,
    endpoint: Endpoint,
    model_version: ModelVersion,
    start: datetime,
    end: datetime,
) -> DriftBaseline:
    """Make a window of the version's own logged traffic its drift reference on ``endpoint``
    (replacing the training sample); every window of the version is then compared again.

    Raises:
        PermissionDenied: ``actor`` is neither a data scientist of the endpoint's team nor a
            platform admin.
        ValidationError: ``end`` is not after ``start``, the window is in the future, or it
            holds fewer than ``drift.MIN_ROWS`` predictions of the version.
    """
    _check_may_choose_baseline(actor, endpoint)
    if end <= start:
        raise ValidationError({"end": "The baseline window must end after it starts."})
    if start > timezone.now():
        raise ValidationError({"start": "The baseline window must start in the past."})
    logged = PredictionLog.objects.filter(
        endpoint=endpoint, model_version=model_version, created_at__gte=start, created_at__lt=end
    ).count()
    if logged < drift.MIN_ROWS:
        raise ValidationError(
            {
                "start": f"The window holds {logged} predictions of v{model_version.version}; "
                f"a baseline needs at least {drift.MIN_ROWS}."
            }
        )
    with transaction.atomic():
        previous = DriftBaseline.objects.filter(
            endpoint=endpoint, model_version=model_version
        ).first()
        baseline, _ = DriftBaseline.objects.update_or_create(
            endpoint=endpoint,
            model_version=model_version,
            defaults={"start": start, "end": end, "chosen_by": actor, "chosen_at": timezone.now()},
        )
        audit_record(
            actor=actor,
            action="drift.baseline_set",
            obj=baseline,
            registered_model=model_version.registered_model.name,
            environment=endpoint.environment.name,
            before=None if previous is None else _window_dict(previous),
            after={**_window_dict(baseline), "rows": logged, "version": model_version.version},
        )
        _mark_version_stale(endpoint, model_version)
    return baseline


def drift_baseline_clear(*, actor: User, endpoint: Endpoint, model_version: ModelVersion) -> bool:
    """Go back to the training sample as the version's drift reference; False when no
    baseline was set. Raises PermissionDenied as :func:`drift_baseline_set`."""
    _check_may_choose_baseline(actor, endpoint)
    with transaction.atomic():
        baseline = DriftBaseline.objects.filter(
            endpoint=endpoint, model_version=model_version
        ).first()
        if baseline is None:
            return False
        audit_record(
            actor=actor,
            action="drift.baseline_cleared",
            obj=baseline,
            registered_model=model_version.registered_model.name,
            environment=endpoint.environment.name,
            before=_window_dict(baseline),
        )
        baseline.delete()
        _mark_version_stale(endpoint, model_version)
    return True


def may_choose_baseline(actor: User, endpoint: Endpoint) -> bool:
    """Platform admins, and data scientists of the team that owns the endpoint's model."""
    if is_platform_admin(actor):
        return True
    team = endpoint.registered_model.team
    return bool(
        can_request_deployment(actor)
        and team is not None
        and team.members.filter(pk=actor.pk).exists()
    )


def _check_may_choose_baseline(actor: User, endpoint: Endpoint) -> None:
    if not may_choose_baseline(actor, endpoint):
        raise PermissionDenied(
            "Only data scientists of the model's team and platform admins choose drift baselines."
        )


def _window_dict(baseline: DriftBaseline) -> dict[str, str]:
    return {"start": baseline.start.isoformat(), "end": baseline.end.isoformat()}


def _mark_version_stale(endpoint: Endpoint, model_version: ModelVersion) -> None:
    hours = Rollup.objects.filter(
        endpoint=endpoint, model_version=model_version, granularity=Granularity.HOUR
    ).values_list("window_start", flat=True)
    windows_mark_stale((endpoint.pk, model_version.pk, hour) for hour in hours)


def drift_settings_saved(*, actor: User, settings_row: DriftSettings, changed: list[str]) -> None:
    """After a platform admin saved an endpoint's drift thresholds (checked by the admin's
    form): audit the new limits and mark every hour of the endpoint stale, so its drift is
    compared again under them."""
    audit_record(
        actor=actor,
        action="drift.settings_saved",
        obj=settings_row,
        registered_model=settings_row.endpoint.registered_model.name,
        environment=settings_row.endpoint.environment.name,
        after={name: getattr(settings_row, name) for name in changed},
    )
    hours = Rollup.objects.filter(
        endpoint_id=settings_row.endpoint_id, granularity=Granularity.HOUR
    ).values_list("model_version_id", "window_start")
    windows_mark_stale((settings_row.endpoint_id, v, h) for v, h in hours)

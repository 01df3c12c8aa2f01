"""Writes of the monitoring app: ground truth and drift baselines."""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from monitoring import drift
from monitoring.metrics import label_key
from monitoring.models import (
    DriftBaseline,
    DriftSettings,
    Granularity,
    GroundTruth,
    PendingFeedback,
    Rollup,
)
from monitoring.rollups import version_classes, version_task, windows_mark_stale
from portal.audit import audit_record
from portal.roles import can_request_deployment, is_platform_admin
from registry.models import ModelVersion
from rollouts.models import Endpoint, PredictionLog

logger = logging.getLogger(__name__)


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
    """What became of a batch of labels: ``accepted`` stored now; ``pending`` kept for requests
    whose prediction row is not written yet (the serving log is buffered), matched when it is
    or dropped after ``FEEDBACK_PENDING_TTL_S``; ``unknown`` the refs of those pending items."""

    accepted: int = 0
    pending: int = 0
    unknown: list[str] = field(default_factory=list)


#: JSON types a single label may have; a regressor's label is a finite number, a classifier's
#: an int, a str, a bool or an integral float (labels read back as floats).
_SCALARS = (bool, int, float, str)


def feedback_record(
    *, items: list[FeedbackItem], endpoint_ids: frozenset[int] | None = None
) -> FeedbackResult:
    """Attach labels to logged predictions by request id or by the client's inference id.

    An inference id that names several requests labels the most recent one. A one-row request
    takes ``label`` as is; a request of k rows takes either ``row`` (which row) or a list of k
    labels. Each label must fit the output of the version that made the prediction
    (:func:`label_problem`). Ids that match no prediction yet (or none on ``endpoint_ids``,
    when an API key limits them) are kept as :class:`PendingFeedback` until the row is written
    (:func:`pending_feedback_match`) or they expire, and counted in ``pending``. A label sent
    again replaces the earlier one.

    Raises:
        ValidationError: keyed ``[i].label`` / ``[i].row`` (i the item's index): a label that
            is not a scalar or a list of scalars, does not fit the version's output (an object,
            a non-number for a regressor, a class the model does not know), an item that
            addresses a row that does not exist, or a multi-row request without ``row``;
            nothing is stored.
    """
    errors: dict[str, str] = {}
    for i, item in enumerate(items):
        if problem := _label_shape_problem(item.label):
            errors[f"[{i}].label"] = problem
    if errors:
        raise ValidationError(errors)
    labels, errors, unmatched = _resolve(items, endpoint_ids)
    if errors:
        raise ValidationError(errors)
    now = timezone.now()
    with transaction.atomic():
        _store_labels(labels, now)
        PendingFeedback.objects.bulk_create(
            [_pending_row(items[i], endpoint_ids, now) for i in unmatched]
        )
    return FeedbackResult(
        accepted=len(labels), pending=len(unmatched), unknown=[items[i].ref for i in unmatched]
    )


def _pending_row(
    item: FeedbackItem, endpoint_ids: frozenset[int] | None, now: datetime
) -> PendingFeedback:
    ttl = timedelta(seconds=getattr(settings, "FEEDBACK_PENDING_TTL_S", 900))
    return PendingFeedback(
        request_id=item.request_id,
        inference_id="" if item.request_id is not None else str(item.inference_id),
        row=item.row,
        label=item.label,
        endpoint_ids=None if endpoint_ids is None else sorted(endpoint_ids),
        received_at=now,
        expires_at=now + ttl,
    )


def _store_labels(labels: dict[int, Any], now: datetime) -> None:
    if not labels:
        return
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


def _resolve(
    items: list[FeedbackItem], endpoint_ids: frozenset[int] | None
) -> tuple[dict[int, Any], dict[str, str], list[int]]:
    """({prediction pk: label}, {"[i].field": error}, indexes of items with no logged row)."""
    by_request = _logged_rows(items, endpoint_ids)
    versions = {
        v.pk: v
        for v in ModelVersion.objects.filter(
            pk__in={vid for rows in by_request.values() for _, vid in rows.values()}
        )
    }
    labels: dict[int, Any] = {}
    errors: dict[str, str] = {}
    unmatched: list[int] = []
    for i, item in enumerate(items):
        logged = by_request.get(item.ref)
        if logged is None:
            unmatched.append(i)
            continue
        label = item.label
        if isinstance(label, list) and len(logged) == 1 and len(label) == 1 and item.row is None:
            label = label[0]
        if item.row is not None:
            if item.row not in logged:
                errors[f"[{i}].row"] = f"request {item.ref} has no row {item.row}."
                continue
            targets = [(logged[item.row], label)]
        elif len(logged) == 1:
            targets = [(next(iter(logged.values())), label)]
        elif isinstance(label, list) and len(label) == len(logged):
            targets = [(logged[row_index], value) for row_index, value in enumerate(label)]
        else:
            errors[f"[{i}].label"] = (
                f"request {item.ref} scored {len(logged)} rows: send 'row' or a list of "
                f"{len(logged)} labels."
            )
            continue
        for (pk, version_id), value in targets:
            if problem := label_problem(value, versions.get(version_id)):
                errors[f"[{i}].label"] = f"request {item.ref}: {problem}"
                break
            labels[pk] = value
    return labels, errors, unmatched


def _label_shape_problem(label: Any) -> str | None:
    """Why a label can be no model's output, whatever the version: None when it may be."""
    values = label if isinstance(label, list) else [label]
    if isinstance(label, list) and not label:
        return "an empty list is not a label."
    for value in values:
        if value is None:
            return "a label must not be null."
        if not isinstance(value, _SCALARS):
            kind = "an object" if isinstance(value, dict) else f"a {type(value).__name__}"
            return (
                f"a label is one number, string or boolean (or a list of them, one per row), "
                f"not {kind}."
            )
        if isinstance(value, float) and not math.isfinite(value):
            return "a label must be a finite number."
    return None


def label_problem(label: Any, version: ModelVersion | None) -> str | None:
    """Why ``label`` cannot be a true value of ``version``'s output; None when it can.

    Regressors (a float output in the signature, :func:`monitoring.rollups.version_task`):
    a finite number, not a boolean. Classifiers: an int, a str, a bool or an integral float,
    and, when the version records its classes (:func:`monitoring.rollups.version_classes`),
    one of them (compared as :func:`monitoring.metrics.label_key` text).
    """
    if problem := _label_shape_problem(label):
        return problem
    if isinstance(label, list):
        return "one label per row: send 'row' or a list of one label per row of the request."
    if version is None:
        return None
    if version_task(version) == "regression":
        if isinstance(label, bool) or not isinstance(label, int | float):
            return f"v{version.version} is a regressor: the label must be a number, got {label!r}."
        return None
    if isinstance(label, float) and not label.is_integer():
        return f"v{version.version} is a classifier: {label!r} is not a class."
    classes = version_classes(version)
    if classes is not None and label_key(label) not in classes:
        shown = ", ".join(classes[:10]) + (", …" if len(classes) > 10 else "")
        return f"v{version.version} knows the classes {shown}; {label!r} is not one of them."
    return None


def pending_feedback_match(
    *, request_ids: Iterable[Any] = (), inference_ids: Iterable[str] = (), everything=False
) -> FeedbackResult:
    """Store the pending labels whose prediction rows are now written, and drop expired ones.

    Called by the serving log writer after each flush with the ids it wrote, and by the
    periodic ``monitoring.match_pending_feedback`` task with ``everything=True`` (labels that
    were kept while their rows were being written). Rows are claimed with ``SELECT … FOR UPDATE
    SKIP LOCKED``, so concurrent callers never apply one twice. A pending label that no longer
    fits (its row does not exist, or the version's output) is dropped and logged. Returns
    ``accepted`` (stored now) and ``pending`` (still waiting).
    """
    now = timezone.now()
    result = FeedbackResult()
    with transaction.atomic():
        PendingFeedback.objects.filter(expires_at__lte=now).delete()
        scope = PendingFeedback.objects.select_for_update(skip_locked=True).order_by("received_at")
        if not everything:
            request_ids, inference_ids = list(request_ids), [i for i in inference_ids if i]
            if not request_ids and not inference_ids:
                return result
            scope = scope.filter(Q(request_id__in=request_ids) | Q(inference_id__in=inference_ids))
        rows = list(scope[:PENDING_MATCH_LIMIT])
        for row in rows:
            item = FeedbackItem(
                label=row.label,
                request_id=row.request_id,
                inference_id=row.inference_id or None,
                row=row.row,
            )
            scope_ids = None if row.endpoint_ids is None else frozenset(row.endpoint_ids)
            labels, errors, unmatched = _resolve([item], scope_ids)
            if unmatched:
                result.pending += 1
                result.unknown.append(item.ref)
                continue
            if errors:
                logger.warning("dropped the pending label for %s: %s", item.ref, errors)
            _store_labels(labels, now)
            result.accepted += len(labels)
            row.delete()
    return result


#: Pending labels handled per call of :func:`pending_feedback_match`.
PENDING_MATCH_LIMIT = 5000


def _logged_rows(
    items: list[FeedbackItem], endpoint_ids: frozenset[int] | None
) -> dict[str, dict[int, tuple[int, int]]]:
    """``{item.ref: {row_index: (prediction pk, model version pk)}}`` for the items' logged
    requests."""
    by_ref: dict[str, dict[int, tuple[int, int]]] = {}
    request_ids = {item.request_id for item in items if item.request_id is not None}
    inference_ids = {item.inference_id for item in items if item.request_id is None}
    scope = PredictionLog.objects.all()
    if endpoint_ids is not None:
        scope = scope.filter(endpoint_id__in=endpoint_ids)
    fields = ("pk", "model_version_id", "request_id", "row_index")
    if request_ids:
        rows = scope.filter(request_id__in=request_ids)
        for pk, version_id, request_id, row_index in rows.values_list(*fields):
            by_ref.setdefault(str(request_id), {})[row_index] = (pk, version_id)
    if inference_ids:
        rows = scope.filter(inference_id__in=inference_ids).order_by("created_at", "pk")
        latest: dict[str, Any] = {}
        for pk, version_id, request_id, row_index, inference_id in rows.values_list(
            *fields, "inference_id"
        ):
            if latest.get(inference_id) != request_id:  # a later request replaces an earlier
                latest[inference_id] = request_id
                by_ref[inference_id] = {}
            by_ref[inference_id][row_index] = (pk, version_id)
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
    endpoint_windows_mark_stale(settings_row.endpoint_id)


def endpoint_windows_mark_stale(endpoint_id: int) -> None:
    """Mark every hourly window of the endpoint stale, so the next rollup refresh compares its
    drift again (under the thresholds now in force)."""
    hours = Rollup.objects.filter(endpoint_id=endpoint_id, granularity=Granularity.HOUR)
    windows_mark_stale(
        (endpoint_id, v, h) for v, h in hours.values_list("model_version_id", "window_start")
    )

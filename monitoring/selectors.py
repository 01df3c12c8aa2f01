"""Reads of the monitoring app for the dashboards and the metrics API.

Everything here reads :class:`~monitoring.models.Rollup` and :class:`~monitoring.models.DriftRollup`
rows (plus endpoints, deployments and requests), never the raw prediction log, and each function
runs a fixed number of SQL queries whatever the number of versions, windows or rollups.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Count, F, Min, Q
from django.db.models.fields.json import KeyTextTransform
from django.utils import timezone

from monitoring import metrics
from monitoring.models import DriftRollup, Granularity, Rollup
from monitoring.rollups import (
    CLASSES_KEYS,
    floor_day,
    floor_hour,
    merge_rollups,
    version_classes,
)
from portal.queries import BadQuery, validated_query
from registry.models import ModelVersion
from rollouts.models import Deployment, DeploymentRequest, Endpoint
from rollouts.selectors import endpoints_visible_to, live_deployments_by_role

WINDOWS = (Granularity.HOUR.value, Granularity.DAY.value)
#: Range shown when ``?days=`` is absent, and the longest range a window allows (longer ranges
#: of hour windows must use day windows: the server aggregates, the browser does not).
DEFAULT_DAYS = {"hour": 7, "day": 90}
MAX_DAYS = {"hour": 31, "day": 731}
#: Without ``?window=``, data spanning more than this is shown in day windows.
AUTO_DAY_WINDOW_AFTER = timedelta(days=3)

#: Figures of the version table that may be undefined, in display order.
QUALITY_FIGURES = ("accuracy", "precision", "recall", "f1", "roc_auc", "rmse", "mae")

#: Heatmap colour of a drift status. "insufficient data", "skipped" (a date/time column, see
#: :mod:`monitoring.drift`) and a window without a result are gaps (None) that show their
#: status and reason on hover.
DRIFT_STATUS_LEVEL = {"ok": 0, "warning": 1, "drift": 2, "insufficient data": None, "skipped": None}


# BadQuery: a dashboard or API query parameter that cannot be honoured; the message says why.

# ---------------------------------------------------------------------------------------------
# The range of a dashboard


@dataclass(frozen=True)
class Range:
    """The windows a page shows: ``granularity`` windows starting at ``start`` up to ``end``."""

    window: str
    days: int
    start: datetime
    end: datetime
    chosen: bool  # the window came from the query, not from the default rule


def dashboard_range(
    endpoint: Endpoint,
    *,
    window: str | None = None,
    days: int | None = None,
    now: datetime | None = None,
) -> Range:
    """The window (``hour`` or ``day``) and range (``days``) of a dashboard, both validated by
    :class:`monitoring.queries.RangeQuery` from the query string.

    Without ``window``: day windows when the range (``days``, else the span of the endpoint's
    data) exceeds 3 days, else hours. Without ``days``: 7 days of hours or 90 days of days.

    Raises:
        BadQuery: an unknown window, ``days`` below 1, or more days than the window allows
            (31 for hours, 731 for days); checked here too, before any date arithmetic.
    """
    now = now or timezone.now()
    if window is not None and window not in WINDOWS:
        raise BadQuery(f"window must be one of {', '.join(WINDOWS)}, not {window!r}.")
    if days is not None and not 1 <= days <= max(MAX_DAYS.values()):
        raise BadQuery(f"days must be from 1 to {max(MAX_DAYS.values())}, not {days}.")
    chosen = window is not None
    if window is None:
        span = timedelta(days=days) if days is not None else data_span(endpoint, now)
        window = Granularity.DAY if span > AUTO_DAY_WINDOW_AFTER else Granularity.HOUR
        window = str(window.value)
    if days is None:
        days = DEFAULT_DAYS[window]
    if days > MAX_DAYS[window]:
        hint = " (choose window=day for longer ranges)" if window == "hour" else ""
        raise BadQuery(f"At most {MAX_DAYS[window]} days of {window} windows{hint}.")
    if window == Granularity.HOUR:
        start = floor_hour(now) - timedelta(hours=24 * days - 1)
    else:
        start = floor_day(now) - timedelta(days=days - 1)
    return Range(window=window, days=days, start=start, end=now, chosen=chosen)


def range_from_query(endpoint: Endpoint, params: Mapping, *, now: datetime | None = None) -> Range:
    """:func:`dashboard_range` of a query dict (``?window=&days=``), validated by
    :class:`monitoring.queries.RangeQuery`. Raises BadQuery naming the field and the range."""
    from monitoring.queries import RangeQuery  # it imports this module's limits

    query = validated_query(RangeQuery, params)
    return dashboard_range(endpoint, window=query.get("window"), days=query.get("days"), now=now)


def data_span(endpoint: Endpoint, now: datetime) -> timedelta:
    """From the endpoint's first day rollup to ``now`` (zero without rollups). One query."""
    first = Rollup.objects.filter(endpoint=endpoint, granularity=Granularity.DAY).aggregate(
        first=Min("window_start")
    )["first"]
    return now - first if first is not None else timedelta(0)


# ---------------------------------------------------------------------------------------------
# Live versions: stable and canary


@dataclass(frozen=True)
class LiveVersion:
    version_id: int
    version: int
    role: str  # a Deployment.Role value: "stable", "canary", "shadow" or "variant"
    traffic_weight: int


def live_versions(endpoint_ids: Iterable[int]) -> dict[int, list[LiveVersion]]:
    """The live versions of each endpoint, stable first. One query.

    Roles are the deployments' own (``rollouts.selectors.live_deployments_by_role``), never
    inferred from traffic weights.
    """
    return {
        endpoint_id: [
            LiveVersion(d.model_version_id, d.model_version.version, d.role, d.traffic_weight)
            for d in deployments
        ]
        for endpoint_id, deployments in live_deployments_by_role(endpoint_ids).items()
    }


# ---------------------------------------------------------------------------------------------
# Per-version figures


@dataclass
class VersionFigures:
    """Figures of one version over a range (the merge of its rollups). Any figure may be None;
    ``undefined`` then says why. ``error_rate`` = errors / (answered + errors)."""

    version_id: int
    version: int
    role: str  # a Deployment.Role value, or "not live"
    traffic_weight: int | None
    task: str
    requests: int = 0
    rows: int = 0
    errors: int = 0
    labeled: int = 0
    error_rate: float | None = None
    label_coverage: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    latency_p99_ms: float | None = None
    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    roc_auc: float | None = None
    rmse: float | None = None
    mae: float | None = None
    average: str = ""
    per_class: list[dict[str, Any]] = field(default_factory=list)
    confusion_labels: list[str] = field(default_factory=list)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    undefined: dict[str, str] = field(default_factory=dict)

    @property
    def is_regression(self) -> bool:
        return self.task == "regression"

    @property
    def confusion_rows(self) -> list[tuple[str, list[int]]]:
        """``(true label, counts per predicted label)`` in ``confusion_labels`` order."""
        return list(zip(self.confusion_labels, self.confusion_matrix, strict=True))


@dataclass
class WindowPoint:
    """Figures of one version in one window, for the charts."""

    version: int
    window_start: datetime
    requests: int
    rows: int
    errors: int
    labeled: int
    error_rate: float | None
    label_coverage: float | None
    accuracy: float | None
    rmse: float | None
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    traffic_share: float | None = None


def _ratio(part: float, whole: float) -> float | None:
    return part / whole if whole else None


def _latency(hist: list[int]) -> tuple[float | None, float | None, float | None]:
    if not hist:
        return None, None, None
    return tuple(metrics.latency_percentile(hist, q) for q in (50, 95, 99))  # type: ignore[return-value]


def figures_from_merged(
    merged: dict[str, Any],
    *,
    version_id: int,
    version: int,
    role: str,
    weight: int | None,
    classes: list[str] | None = None,
) -> VersionFigures:
    """:class:`VersionFigures` of :func:`monitoring.rollups.merge_rollups` output; a
    classifier's figures are over ``classes`` (the classes the version knows,
    :func:`monitoring.rollups.version_classes`) and any label seen."""
    task = merged["task"] or "classification"
    fig = VersionFigures(
        version_id=version_id, version=version, role=role, traffic_weight=weight, task=task
    )
    fig.requests, fig.rows = merged["requests"], merged["rows"]
    fig.errors, fig.labeled = merged["errors"], merged["labeled"]
    fig.error_rate = _ratio(fig.errors, fig.requests + fig.errors)
    fig.label_coverage = _ratio(fig.labeled, fig.rows)
    if fig.error_rate is None:
        fig.undefined["error_rate"] = "no requests in the range"
    if fig.label_coverage is None:
        fig.undefined["label_coverage"] = "no predictions in the range"
    fig.latency_p50_ms, fig.latency_p95_ms, fig.latency_p99_ms = _latency(merged["latency_hist"])
    if task == "regression":
        quality = metrics.regression_quality(
            merged["labeled"], merged["squared_error_sum"], merged["absolute_error_sum"]
        )
        for name in ("accuracy", "precision", "recall", "f1", "roc_auc"):
            quality.undefined[name] = "not a classifier"
    else:
        confusion = metrics.Confusion(counts=merged["confusion"])
        scored = bool(merged["score_pos_hist"])
        quality = metrics.classification_quality(
            confusion,
            merged["score_pos_hist"] if scored else None,
            merged["score_neg_hist"] if scored else None,
            classes=classes,
        )
        for name in ("rmse", "mae"):
            quality.undefined[name] = "not a regressor"
        fig.per_class = quality.per_class
        fig.confusion_labels = [c["label"] for c in quality.per_class]
        counts = confusion.counts
        fig.confusion_matrix = [
            [counts.get(t, {}).get(p, 0) for p in fig.confusion_labels]
            for t in fig.confusion_labels
        ]
    for name in QUALITY_FIGURES:
        setattr(fig, name, getattr(quality, name))
    fig.average = quality.average
    fig.undefined.update(quality.undefined)
    return fig


def _window_point(r: Rollup, version: int) -> WindowPoint:
    accuracy = rmse = None
    if r.task == "regression":
        if r.labeled:
            rmse = math.sqrt(r.squared_error_sum / r.labeled)
    else:
        total = correct = 0
        for label, row in (r.confusion or {}).items():
            total += sum(row.values())
            correct += row.get(label, 0)
        accuracy = _ratio(correct, total)
    p50, p95, p99 = _latency(r.latency_hist)
    return WindowPoint(
        version=version,
        window_start=r.window_start,
        requests=r.requests,
        rows=r.rows,
        errors=r.errors,
        labeled=r.labeled,
        error_rate=_ratio(r.errors, r.requests + r.errors),
        label_coverage=_ratio(r.labeled, r.rows),
        accuracy=accuracy,
        rmse=rmse,
        latency_p50_ms=p50,
        latency_p95_ms=p95,
        latency_p99_ms=p99,
    )


def _range_score_histograms(
    endpoint: Endpoint, rng: Range
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per version id, the score histograms of the hours since ``rng.start``: the hour rollups
    of its first, partial day and the day rollups of the days after it. One query."""
    first_day = floor_day(rng.start)
    rows = (
        Rollup.objects.filter(endpoint=endpoint)
        .filter(
            Q(granularity=Granularity.HOUR, window_start__gte=rng.start)
            & Q(window_start__lt=first_day + timedelta(days=1))
            | Q(granularity=Granularity.DAY, window_start__gt=first_day)
        )
        .values_list("model_version_id", "score_pos_hist", "score_neg_hist")
    )
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for version_id, pos, neg in rows:
        total_pos, total_neg = out.get(version_id, (np.zeros(0, np.int64),) * 2)
        out[version_id] = (
            metrics.add_histograms(total_pos, pos),
            metrics.add_histograms(total_neg, neg),
        )
    return out


@dataclass
class EndpointFigures:
    versions: list[VersionFigures]
    series: list[WindowPoint]


def endpoint_figures(
    endpoint: Endpoint, rng: Range, live: list[LiveVersion] | None = None
) -> EndpointFigures:
    """Per version: the range's figures (stable first, then canaries, then versions no longer
    live, newest first) and one point per window with traffic. One query for the rollups (plus
    one for the live versions when ``live`` is not given)."""
    if live is None:
        live = live_versions([endpoint.pk]).get(endpoint.pk, [])
    query = Rollup.objects.filter(
        endpoint=endpoint, granularity=rng.window, window_start__gte=rng.start
    )
    scores: dict[int, tuple[np.ndarray, np.ndarray]] | None = None
    if rng.window == Granularity.HOUR:
        # Hour windows need no score histograms (ROC AUC is a range figure): take them from the
        # range's day rollups instead, hundreds of rows fewer to decode.
        query = query.defer("score_pos_hist", "score_neg_hist")
        scores = _range_score_histograms(endpoint, rng)
    # The classes a version records (rollups.CLASSES_KEYS) come with its rollups: no extra query.
    recorded_keys = {
        f"_{source}_{i}": KeyTextTransform(key, f"model_version__{source}")
        for source in ("tags", "params")
        for i, key in enumerate(CLASSES_KEYS)
    }
    rollups = list(
        query.annotate(version_number=F("model_version__version"), **recorded_keys).order_by(
            "window_start", "model_version_id"
        )
    )
    recorded: dict[int, ModelVersion] = {}
    for r in rollups:
        if r.model_version_id not in recorded:
            recorded[r.model_version_id] = ModelVersion(
                pk=r.model_version_id,
                tags={k: getattr(r, f"_tags_{i}") for i, k in enumerate(CLASSES_KEYS)},
                params={k: getattr(r, f"_params_{i}") for i, k in enumerate(CLASSES_KEYS)},
            )
    if scores is not None:
        for r in rollups:
            r.score_pos_hist = r.score_neg_hist = []  # set, so never loaded one by one
    by_version: dict[int, list[Rollup]] = defaultdict(list)
    numbers: dict[int, int] = {lv.version_id: lv.version for lv in live}
    series: list[WindowPoint] = []
    totals: dict[datetime, int] = defaultdict(int)
    for r in rollups:
        by_version[r.model_version_id].append(r)
        numbers[r.model_version_id] = r.version_number
        series.append(_window_point(r, r.version_number))
        totals[r.window_start] += r.requests
    for point in series:
        point.traffic_share = _ratio(point.requests, totals[point.window_start])
    roles = {lv.version_id: lv for lv in live}
    known = {vid: version_classes(v) for vid, v in recorded.items()}
    versions = []
    for version_id, number in numbers.items():
        lv = roles.get(version_id)
        merged = merge_rollups(by_version.get(version_id, []))
        if scores is not None and version_id in scores:
            merged["score_pos_hist"], merged["score_neg_hist"] = (
                h.tolist() for h in scores[version_id]
            )
        versions.append(
            figures_from_merged(
                merged,
                version_id=version_id,
                version=number,
                role=lv.role if lv else "not live",
                weight=lv.traffic_weight if lv else None,
                classes=known.get(version_id),
            )
        )
    order = {"stable": 0, "canary": 1, "shadow": 2, "variant": 3, "not live": 4}
    versions.sort(key=lambda v: (order[v.role], -v.version))
    return EndpointFigures(versions=versions, series=series)


# ---------------------------------------------------------------------------------------------
# Drift


@dataclass
class DriftWindow:
    """One drift rollup without its histograms (they are read one at a time, on click);
    ``result`` is its summary (:func:`monitoring.rollups.drift_summary`)."""

    id: int
    version: int
    window_start: datetime
    rows: int
    reference: str
    drifted: bool | None
    share_drifted: float | None
    result: dict[str, Any]

    @property
    def features(self) -> list[dict[str, Any]]:
        return self.result.get("features") or []

    @property
    def prediction(self) -> dict[str, Any] | None:
        return self.result.get("prediction")

    @property
    def drifted_features(self) -> list[str]:
        return [f["name"] for f in self.features if f.get("status") == "drift"]

    @property
    def status(self) -> str:
        if self.drifted is None:
            return "insufficient data"
        return "drift" if self.drifted else "ok"


def drift_windows(endpoint: Endpoint, rng: Range) -> list[DriftWindow]:
    """The endpoint's drift rollups in the range, oldest first. One query; histograms are
    left in the database."""
    rows = (
        DriftRollup.objects.filter(
            endpoint=endpoint, granularity=rng.window, window_start__gte=rng.start
        )
        .order_by("window_start", "model_version_id")
        .values_list(
            "pk",
            "model_version__version",
            "window_start",
            "rows",
            "reference",
            "drifted",
            "share_drifted",
            "summary",  # a tenth of "result": pages need names, statuses, PSI and reasons
        )
    )
    return [DriftWindow(*row) for row in rows]


def drift_window_for_feature(windows: list[DriftWindow], feature: str) -> DriftWindow | None:
    """The window whose histograms of ``feature`` a page opens first: the latest in which it
    drifted, else the latest that evaluated it."""
    latest = None
    for w in reversed(windows):
        for f in [*w.features, *([w.prediction] if w.prediction else [])]:
            if f.get("name") != feature:
                continue
            if f.get("status") == "drift":
                return w
            latest = latest or w
    return latest


def drift_histogram(endpoint: Endpoint, rollup_id: int, feature: str) -> dict[str, Any] | None:
    """Reference-vs-current shares of one feature in one drift rollup of ``endpoint``, with
    the feature's drift figures; None when the rollup is not the endpoint's or the feature has
    no histogram. One query."""
    row = (
        DriftRollup.objects.filter(pk=rollup_id, endpoint=endpoint)
        .values_list(
            "model_version__version",
            "granularity",
            "window_start",
            "reference",
            "histograms",
            "result",
        )
        .first()
    )
    if row is None:
        return None
    version, granularity, window_start, reference, hists, result = row
    hist = (hists or {}).get(feature)
    if not hist:
        return None
    figures = next(
        (
            f
            for f in [*(result.get("features") or []), result.get("prediction") or {}]
            if f.get("name") == feature
        ),
        None,
    )
    return {
        "feature": feature,
        "version": version,
        "window": granularity,
        "window_start": window_start,
        "reference_source": reference,
        "histogram": hist,
        "drift": figures,
    }


# ---------------------------------------------------------------------------------------------
# The manager overview


def open_alert_counts(endpoint_ids: Iterable[int]) -> dict[int, int]:
    """Open and acknowledged (not yet resolved) alerts per endpoint id: ``{endpoint_id: count}``.
    One grouped query (:func:`monitoring.alerts.open_alert_counts`)."""
    from monitoring.alerts import open_alert_counts as counts

    return counts(endpoint_ids)


@dataclass
class EndpointHealth:
    """The last 24 hours of one endpoint, all versions together, from hour rollups."""

    requests: int = 0
    errors: int = 0
    error_rate: float | None = None
    latency_p95_ms: float | None = None

    @property
    def undefined(self) -> dict[str, str]:
        reason = "no requests in 24 h"
        return {"error_rate": reason, "latency_p95_ms": reason} if not self.requests else {}


def endpoint_health(
    endpoint_ids: Iterable[int], *, now: datetime | None = None
) -> dict[int, EndpointHealth]:
    """Requests, error rate (errors / (answered + errors)) and p95 latency of each endpoint in
    the 24 hour windows up to and including the current one. One query."""
    now = now or timezone.now()
    since = floor_hour(now) - timedelta(hours=23)
    rows = Rollup.objects.filter(
        endpoint_id__in=list(endpoint_ids), granularity=Granularity.HOUR, window_start__gte=since
    ).values_list("endpoint_id", "requests", "errors", "latency_hist")
    hists: dict[int, np.ndarray] = {}
    out: dict[int, EndpointHealth] = {}
    for endpoint_id, requests, errors, hist in rows:
        health = out.setdefault(endpoint_id, EndpointHealth())
        health.requests += requests
        health.errors += errors
        if hist:
            empty = np.zeros(0, dtype=np.int64)
            hists[endpoint_id] = metrics.add_histograms(hists.get(endpoint_id, empty), hist)
    for endpoint_id, health in out.items():
        health.error_rate = _ratio(health.errors, health.requests + health.errors)
        if endpoint_id in hists:
            health.latency_p95_ms = metrics.latency_percentile(hists[endpoint_id], 95)
    return out


#: How far back the overview looks for drifted features.
RECENT_DRIFT_DAYS = 7


@dataclass
class RecentDrift:
    """One version's drift over the overview's recent days: the latest day window's status,
    and every feature that drifted in any of those days, most recent drift first."""

    version: int
    window_start: datetime
    status: str
    drifted_features: list[str]
    prediction: dict[str, str] | None


def recent_drift(
    endpoint_ids: Iterable[int], *, now: datetime | None = None, days: int = RECENT_DRIFT_DAYS
) -> dict[int, list[RecentDrift]]:
    """Per endpoint and version (version order): the day windows of the last ``days`` days
    summed up as :class:`RecentDrift`. A drift episode stays on the overview after its last
    drifted day, until ``days`` have passed. One query."""
    since = floor_day(now or timezone.now()) - timedelta(days=days - 1)
    rows = (
        DriftRollup.objects.filter(
            endpoint_id__in=list(endpoint_ids),
            granularity=Granularity.DAY,
            window_start__gte=since,
        )
        .order_by("endpoint_id", "model_version__version", "-window_start")
        .values_list(
            "endpoint_id",
            "pk",
            "model_version__version",
            "window_start",
            "rows",
            "reference",
            "drifted",
            "share_drifted",
            "summary",
        )
    )
    out: dict[int, dict[int, RecentDrift]] = defaultdict(dict)
    for endpoint_id, *rest in rows:
        window = DriftWindow(*rest)  # newest first per version
        recent = out[endpoint_id].get(window.version)
        if recent is None:
            recent = out[endpoint_id][window.version] = RecentDrift(
                version=window.version,
                window_start=window.window_start,
                status=window.status,
                drifted_features=[],
                prediction=None,
            )
        for name in window.drifted_features:
            if name not in recent.drifted_features:
                recent.drifted_features.append(name)
        if (window.prediction or {}).get("status") == "drift":
            recent.prediction = {"status": "drift"}
    return {endpoint_id: list(by_version.values()) for endpoint_id, by_version in out.items()}


def pending_approvals(endpoint_ids: Iterable[int]) -> dict[int, int]:
    """Requests awaiting review per endpoint id. One query."""
    rows = (
        DeploymentRequest.objects.filter(
            endpoint_id__in=list(endpoint_ids), status=DeploymentRequest.Status.AWAITING_REVIEW
        )
        .values("endpoint_id")
        .annotate(n=Count("pk"))
        .values_list("endpoint_id", "n")
    )
    return dict(rows)


@dataclass
class DeliveryFigures:
    """DORA delivery figures over the ``days`` before ``now`` on the endpoints a user sees.

    * ``deployments_per_week``: deployments whose ``live_at`` falls in the period, per week
      (``deployments_live / (days / 7)``). A rollback restores an earlier deployment without
      a new ``live_at``, so restores are not counted.
    * ``lead_time_median``: median of ``Deployment.live_at - DeploymentRequest.created_at``
      over those deployments (request to live, gates and reviews included).
    * ``change_failure_rate``: of the rollouts started in the period (deployments whose
      ``started_at`` falls in it) that either went live or failed to deploy, the share whose
      request ended ``rolled_back`` or ``failed``.
    * ``time_to_restore_median``: for each deployment whose request was rolled back and whose
      rollback (its ``retired_at``: the rollback retires it and puts the previous release live
      in the same transaction) falls in the period, ``retired_at - live_at``: how long the
      failed release served before the previous version was live again. A deployment that failed
      before going live left the previous release serving, so it has nothing to restore.

    A figure is None when its population is empty; ``undefined`` says why.
    """

    days: int
    deployments_live: int = 0
    deployments_per_week: float = 0.0
    lead_time_median: timedelta | None = None
    rollouts: int = 0
    failed_rollouts: int = 0
    change_failure_rate: float | None = None
    restores: int = 0
    time_to_restore_median: timedelta | None = None
    undefined: dict[str, str] = field(default_factory=dict)


def _median(values: list[timedelta]) -> timedelta | None:
    if not values:
        return None
    return timedelta(seconds=statistics.median(v.total_seconds() for v in values))


def delivery_figures(
    user: User | AnonymousUser, *, days: int = 90, now: datetime | None = None
) -> DeliveryFigures:
    """:class:`DeliveryFigures` of the endpoints visible to ``user``. One query."""
    now = now or timezone.now()
    since = now - timedelta(days=days)
    rows = (
        Deployment.objects.filter(endpoint__in=endpoints_visible_to(user).values("pk"))
        .filter(Q(started_at__gte=since) | Q(live_at__gte=since) | Q(retired_at__gte=since))
        .values_list(
            "status",
            "request__status",
            "request__created_at",
            "started_at",
            "live_at",
            "retired_at",
        )
    )
    S = DeploymentRequest.Status
    out = DeliveryFigures(days=days)
    lead_times: list[timedelta] = []
    restore_times: list[timedelta] = []
    for status, request_status, requested_at, started_at, live_at, retired_at in rows:
        if live_at is not None and since <= live_at <= now:
            out.deployments_live += 1
            lead_times.append(live_at - requested_at)
        if since <= started_at <= now and (live_at is not None or status == "failed"):
            out.rollouts += 1
            if request_status in (S.ROLLED_BACK, S.FAILED):
                out.failed_rollouts += 1
        if (
            request_status == S.ROLLED_BACK
            and live_at is not None
            and retired_at is not None
            and since <= retired_at <= now
        ):
            out.restores += 1
            restore_times.append(retired_at - live_at)
    out.deployments_per_week = out.deployments_live / (days / 7)
    out.lead_time_median = _median(lead_times)
    out.change_failure_rate = _ratio(out.failed_rollouts, out.rollouts)
    out.time_to_restore_median = _median(restore_times)
    if out.lead_time_median is None:
        out.undefined["lead_time_median"] = "no deployment went live"
    if out.change_failure_rate is None:
        out.undefined["change_failure_rate"] = "no rollout started"
    if out.time_to_restore_median is None:
        out.undefined["time_to_restore_median"] = "nothing was rolled back"
    return out


@dataclass
class EndpointSummary:
    """One row of the manager overview."""

    endpoint: Endpoint
    live: list[LiveVersion]
    health: EndpointHealth
    drift: list[RecentDrift]
    open_alerts: int
    pending_approvals: int


def overview_endpoints(
    user: User | AnonymousUser, *, now: datetime | None = None
) -> list[EndpointSummary]:
    """Every endpoint visible to ``user`` with its live versions, 24 hour health, recent drift
    (:func:`recent_drift`), open alerts and pending approvals. Six queries, whatever the number of endpoints."""
    endpoints = list(endpoints_visible_to(user))
    ids = [e.pk for e in endpoints]
    live = live_versions(ids)
    health = endpoint_health(ids, now=now)
    drift = recent_drift(ids, now=now)
    alerts = open_alert_counts(ids)
    pending = pending_approvals(ids)
    return [
        EndpointSummary(
            endpoint=e,
            live=live.get(e.pk, []),
            health=health.get(e.pk, EndpointHealth()),
            drift=drift.get(e.pk, []),
            open_alerts=alerts.get(e.pk, 0),
            pending_approvals=pending.get(e.pk, 0),
        )
        for e in endpoints
    ]

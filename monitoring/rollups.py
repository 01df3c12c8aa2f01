"""Rollups: per version, endpoint and hour (and day), the figures that pages read.

The write path marks hours stale (:func:`windows_mark_stale`: the serving log writer for new
predictions and errors, :func:`monitoring.services.feedback_record` for late labels); the
``monitoring.refresh_rollups`` task, run by Celery beat, recomputes each stale hour from the raw
log, merges the hours of its day into the day's rollup, and recomputes the drift of both
windows against the version's reference. Pages then read only :class:`Rollup` and
:class:`DriftRollup` rows.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from monitoring import drift, metrics
from monitoring.models import (
    DriftBaseline,
    DriftRollup,
    DriftSettings,
    Granularity,
    Rollup,
    StaleWindow,
)
from registry.models import ModelVersion
from rollouts.models import Endpoint, PredictionLog, ServingError

logger = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
DAY = timedelta(days=1)

#: Output types of an MLflow signature that make a model a regressor; any other is a classifier.
REGRESSION_TYPES = {"double", "float"}

#: Columns drawn per histogram; categories beyond the most frequent are left out of the chart
#: (not out of the drift figures).
HISTOGRAM_BINS = 20
HISTOGRAM_CATEGORIES = 20


def floor_hour(moment: datetime) -> datetime:
    return moment.replace(minute=0, second=0, microsecond=0)


def floor_day(moment: datetime) -> datetime:
    return moment.replace(hour=0, minute=0, second=0, microsecond=0)


def window_length(granularity: str) -> timedelta:
    return HOUR if granularity == Granularity.HOUR else DAY


# ---------------------------------------------------------------------------------------------
# Marking


def windows_mark_stale(keys: Iterable[tuple[int, int | None, datetime]]) -> int:
    """Mark the hours of ``(endpoint_id, model_version_id, created_at)`` stale; keys without a
    version are skipped. Returns how many distinct hours were marked."""
    hours = {(e, v, floor_hour(t)) for e, v, t in keys if v is not None}
    if not hours:
        return 0
    now = timezone.now()
    StaleWindow.objects.bulk_create(
        [
            StaleWindow(endpoint_id=e, model_version_id=v, hour=h, marked_at=now)
            for e, v, h in hours
        ],
        update_conflicts=True,
        unique_fields=["endpoint", "model_version", "hour"],
        update_fields=["marked_at"],
    )
    return len(hours)


def mark_logged_rows(rows: Iterable[Any]) -> int:
    """The log writer's hook for freshly written :class:`PredictionLog` / :class:`ServingError`
    instances: :func:`windows_mark_stale` for their hours, then the labels that arrived before
    their predictions were written are matched
    (:func:`monitoring.services.pending_feedback_match`). Returns how many hours were marked."""
    rows = list(rows)
    marked = windows_mark_stale(
        (row.endpoint_id, row.model_version_id, row.created_at)
        for row in rows
        if isinstance(row, PredictionLog | ServingError)
    )
    predictions = [row for row in rows if isinstance(row, PredictionLog)]
    if predictions:
        from monitoring.services import pending_feedback_match  # services imports this module

        pending_feedback_match(
            request_ids={row.request_id for row in predictions},
            inference_ids={row.inference_id for row in predictions if row.inference_id},
        )
    return marked


# ---------------------------------------------------------------------------------------------
# Quality rollups


def version_task(version: ModelVersion) -> str:
    """``regression`` when the signature's (single) output is a float column, else
    ``classification``."""
    outputs = (version.signature or {}).get("outputs") or []
    types = {str(col.get("type", "")) for col in outputs if isinstance(col, dict)}
    if types and types <= REGRESSION_TYPES:
        return "regression"
    return "classification"


#: Where a version records the classes it knows: a tag or a param of this name holding a JSON
#: list (``["setosa", "versicolor"]``) or comma-separated text (``0,1,2``).
CLASSES_KEYS = ("rollgate.classes", "classes")


def version_classes(version: ModelVersion) -> list[str] | None:
    """The classes a classifier version knows, as :func:`monitoring.metrics.label_key` text in
    sorted order, from its MLflow tags or run params (:data:`CLASSES_KEYS`, logged at training
    time from the training labels, as ``registry.demo_models`` does); None when it records
    none or is a regressor."""
    if version_task(version) == "regression":
        return None
    for source in (version.tags or {}, version.params or {}):
        for key in CLASSES_KEYS:
            raw = source.get(key)
            if raw in (None, ""):
                continue
            try:
                values = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                values = [v.strip() for v in str(raw).split(",") if v.strip()]
            if not isinstance(values, list):
                values = [values]
            keys = {metrics.label_key(v) for v in values if not isinstance(v, dict | list)}
            if keys:
                return sorted(keys, key=metrics.class_order)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def compute_hour(endpoint_id: int, version: ModelVersion, start: datetime) -> dict[str, Any]:
    """The rollup fields of one hour, read from the raw log (the only reader of it)."""
    end = start + HOUR
    logged = PredictionLog.objects.filter(
        endpoint_id=endpoint_id, model_version=version, created_at__gte=start, created_at__lt=end
    ).values_list(
        "row_index", "latency_ms", "prediction", "score", "ground_truth__id", "ground_truth__label"
    )
    task = version_task(version)
    requests = rows = 0
    latencies: list[float] = []
    confusion = metrics.Confusion()
    scores: list[float | None] = []
    positive: list[bool] = []
    labeled = 0
    sq = ab = 0.0
    for row_index, latency, prediction, score, label_id, label in logged.iterator(chunk_size=5000):
        rows += 1
        if row_index == 0:
            requests += 1
            latencies.append(latency)
        if label_id is None:
            continue
        if task == "regression":
            y, y_hat = _number(label), _number(prediction)
            if y is None or y_hat is None:
                continue
            labeled += 1
            sq += (y - y_hat) ** 2
            ab += abs(y - y_hat)
        else:
            labeled += 1
            confusion.add(label, prediction)
            scores.append(score)
            positive.append(metrics.label_key(label) in ("1", "true"))
    errors = ServingError.objects.filter(
        endpoint_id=endpoint_id, model_version=version, created_at__gte=start, created_at__lt=end
    ).count()
    pos_hist, neg_hist = metrics.score_histograms(scores, positive)
    if not any(s is not None for s in scores):
        pos_hist, neg_hist = [], []
    return {
        "requests": requests,
        "rows": rows,
        "errors": errors,
        "latency_hist": metrics.latency_histogram(latencies),
        "labeled": labeled,
        "task": task,
        "confusion": confusion.counts,
        "score_pos_hist": pos_hist,
        "score_neg_hist": neg_hist,
        "squared_error_sum": sq,
        "absolute_error_sum": ab,
    }


def merge_rollups(parts: Iterable[Rollup]) -> dict[str, Any]:
    """The fields of the rollup that covers ``parts`` (e.g. the hours of a day)."""
    out: dict[str, Any] = {
        "requests": 0,
        "rows": 0,
        "errors": 0,
        "labeled": 0,
        "task": "",
        "squared_error_sum": 0.0,
        "absolute_error_sum": 0.0,
    }
    latency = np.zeros(0, dtype=np.int64)
    pos = np.zeros(metrics.SCORE_BINS, dtype=np.int64)
    neg = np.zeros(metrics.SCORE_BINS, dtype=np.int64)
    scored = False
    confusion = metrics.Confusion()
    for part in parts:
        for name in ("requests", "rows", "errors", "labeled"):
            out[name] += getattr(part, name)
        out["squared_error_sum"] += part.squared_error_sum
        out["absolute_error_sum"] += part.absolute_error_sum
        out["task"] = out["task"] or part.task
        if part.latency_hist:
            latency = metrics.add_histograms(latency, part.latency_hist)
        if part.score_pos_hist:
            scored = True
            pos += np.asarray(part.score_pos_hist, dtype=np.int64)
            neg += np.asarray(part.score_neg_hist, dtype=np.int64)
        confusion.merge(part.confusion)
    out["latency_hist"] = latency.tolist()
    out["score_pos_hist"] = pos.tolist() if scored else []
    out["score_neg_hist"] = neg.tolist() if scored else []
    out["confusion"] = confusion.counts
    return out


def _save_rollup(
    endpoint_id: int, version_id: int, granularity: str, start: datetime, fields: dict
) -> None:
    """Store a window's rollup; a window left with nothing in it (its rows were moved or
    deleted) loses its rollup instead of keeping a row of zeros."""
    key = dict(
        endpoint_id=endpoint_id,
        model_version_id=version_id,
        granularity=granularity,
        window_start=start,
    )
    if not fields["rows"] and not fields["errors"]:
        Rollup.objects.filter(**key).delete()
        return
    Rollup.objects.update_or_create(**key, defaults={**fields, "computed_at": timezone.now()})


# ---------------------------------------------------------------------------------------------
# Drift rollups


@dataclass(frozen=True)
class PreparedReference:
    reference: drift.Reference
    source: str
    frame: pd.DataFrame


#: Prepared references kept per process (oldest dropped first).
REFERENCE_CACHE_SIZE = 32
_references: OrderedDict[tuple, PreparedReference | None] = OrderedDict()


def _window_frame(
    endpoint_id: int, version_id: int, start: datetime, end: datetime
) -> pd.DataFrame:
    logged = PredictionLog.objects.filter(
        endpoint_id=endpoint_id,
        model_version_id=version_id,
        created_at__gte=start,
        created_at__lt=end,
    ).values_list("features", "prediction")
    features, predictions = [], []
    for row, prediction in logged.iterator(chunk_size=5000):
        features.append(row if isinstance(row, dict) else {})
        predictions.append(prediction if not isinstance(prediction, list | dict) else None)
    frame = pd.DataFrame.from_records(features) if features else pd.DataFrame()
    frame["prediction"] = pd.Series(predictions, dtype=object) if predictions else []
    return frame


def _columns_of(version: ModelVersion) -> list[str]:
    return [str(col["name"]) for col in version.input_columns if col.get("name") is not None]


def reference_for(endpoint_id: int, version: ModelVersion) -> PreparedReference | None:
    """The version's drift reference on this endpoint: the chosen baseline window if there is
    one, else the training sample logged with the model (its predictions scored by the model
    itself, for prediction drift). None when neither exists. Cached per process."""
    baseline = DriftBaseline.objects.filter(endpoint_id=endpoint_id, model_version=version).first()
    key = (endpoint_id, version.pk, version.run_id, baseline.chosen_at if baseline else None)
    if key in _references:
        _references.move_to_end(key)
        return _references[key]
    from registry import mlflow_client

    columns = _columns_of(version)
    prepared: PreparedReference | None = None
    if baseline is not None:
        frame = _window_frame(endpoint_id, version.pk, baseline.start, baseline.end)
        source = f"baseline window {baseline.start:%Y-%m-%d %H:%M} – {baseline.end:%Y-%m-%d %H:%M}"
    else:
        try:
            frame = mlflow_client.reference_sample(version.run_id)
        except mlflow_client.RegistryError as exc:
            logger.warning("no drift reference for %s: %s", version, exc)
            frame = None
        source = f"training sample of v{version.version} ({mlflow_client.REFERENCE_SAMPLE_PATH})"
        if frame is not None:
            frame = frame[[c for c in frame.columns if c in columns or not columns]]
            if "target" in frame.columns and "target" not in columns:
                frame = frame.drop(columns="target")
            try:
                model = mlflow_client.load_pyfunc(version.registered_model.name, version.version)
                frame = frame.assign(prediction=list(model.predict(frame)))
            except Exception as exc:  # noqa: BLE001 - prediction drift is optional
                logger.warning("cannot score the reference of %s: %s", version, exc)
    if frame is not None and len(frame):
        names = columns or [c for c in frame.columns if c != "prediction"]
        names = [c for c in names if c in frame.columns]
        has_prediction = "prediction" in frame.columns and frame["prediction"].notna().any()
        reference = drift.prepare_reference(
            frame,
            columns=names + (["prediction"] if has_prediction else []),
            prediction="prediction" if has_prediction else None,
        )
        prepared = PreparedReference(reference=reference, source=source[:200], frame=frame)
    _references[key] = prepared
    while len(_references) > REFERENCE_CACHE_SIZE:
        _references.popitem(last=False)
    return prepared


def thresholds_for(endpoint_id: int) -> tuple[drift.Thresholds, dict[str, drift.Thresholds], float]:
    """(default thresholds, per-feature thresholds, dataset drift share) of an endpoint."""
    settings_row = DriftSettings.objects.filter(endpoint_id=endpoint_id).first()
    if settings_row is None:
        return drift.DEFAULT_THRESHOLDS, {}, drift.DRIFT_SHARE
    base = drift.Thresholds(
        psi_warning=settings_row.psi_warning,
        psi_drift=settings_row.psi_drift,
        wasserstein=settings_row.wasserstein,
        jensen_shannon=settings_row.jensen_shannon,
        missing_change=settings_row.missing_change,
    )
    per_feature = {
        name: drift.Thresholds(**{**base.__dict__, **overrides})
        for name, overrides in (settings_row.feature_thresholds or {}).items()
    }
    return base, per_feature, settings_row.drift_share


def histograms(reference: PreparedReference, current: pd.DataFrame) -> dict[str, dict]:
    """Reference-vs-current shares per column, for the drift chart of one feature: numeric
    columns on :data:`HISTOGRAM_BINS` equal bins over the finite values of both sides,
    categorical ones over the most frequent categories."""
    out: dict[str, dict] = {}
    for name, column in reference.reference.columns.items():
        if isinstance(column, drift.DatetimeReference):
            continue  # skipped by the drift engine: nothing to compare
        cur = current[name] if name in current.columns else pd.Series([], dtype=object)
        if isinstance(column, drift.NumericReference):
            ref_values = column.values
            cur_values = pd.to_numeric(cur, errors="coerce").to_numpy(dtype=float)
            cur_values = cur_values[np.isfinite(cur_values)]
            both = np.concatenate([ref_values, cur_values])
            if not len(both):
                continue
            lo, hi = float(both.min()), float(both.max())
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
            edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
            out[name] = {
                "kind": "numeric",
                "edges": edges.tolist(),
                "reference": _shares(np.histogram(ref_values, edges)[0]),
                "current": _shares(np.histogram(cur_values, edges)[0]),
            }
        else:
            cur_counts, _, _ = drift.category_counts(cur.to_numpy(dtype=object))
            combined = {
                k: column.counts.get(k, 0) + cur_counts.get(k, 0)
                for k in set(column.counts) | set(cur_counts)
            }
            top = sorted(combined, key=lambda k: (-combined[k], k))[:HISTOGRAM_CATEGORIES]
            out[name] = {
                "kind": "categorical",
                "categories": top,
                "reference": _shares(np.array([column.counts.get(k, 0) for k in top])),
                "current": _shares(np.array([cur_counts.get(k, 0) for k in top])),
            }
    return out


def _shares(counts: np.ndarray) -> list[float]:
    total = counts.sum()
    return (counts / total).tolist() if total else [0.0] * len(counts)


#: The figures of a feature that pages show (heatmap colour and hover, drift tables).
SUMMARY_FIELDS = ("name", "status", "psi", "jensen_shannon", "reason")


def drift_summary(result: dict[str, Any]) -> dict[str, Any]:
    """The part of a :meth:`DatasetDrift.as_dict` result that pages read: per feature (and the
    prediction) its name, status, PSI, Jensen-Shannon distance and reason; the window's
    reason and counts. The full result stays for the one-feature histogram view."""

    def trim(feature: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if feature is None else {k: feature.get(k) for k in SUMMARY_FIELDS}

    return {
        "reason": result.get("reason"),
        "n_evaluated": result.get("n_evaluated"),
        "n_drifted": result.get("n_drifted"),
        "features": [trim(f) for f in result.get("features") or []],
        "prediction": trim(result.get("prediction")),
    }


def compute_drift_window(
    endpoint_id: int, version: ModelVersion, granularity: str, start: datetime
) -> dict[str, Any]:
    """The drift rollup fields of one window (reads the window's logged features)."""
    current = _window_frame(endpoint_id, version.pk, start, start + window_length(granularity))
    prepared = reference_for(endpoint_id, version)
    if prepared is None:
        reason = "insufficient data: the version has no reference sample and no baseline window"
        return {
            "rows": len(current),
            "reference": "none",
            "drifted": None,
            "share_drifted": None,
            "result": {"drifted": None, "reason": reason, "features": [], "prediction": None},
            "summary": {"reason": reason, "features": [], "prediction": None},
            "histograms": {},
        }
    base, per_feature, share = thresholds_for(endpoint_id)
    per_feature = {k: v for k, v in per_feature.items() if k in prepared.reference.columns}
    result = drift.compute_drift(
        prepared.reference,
        current,
        thresholds=base,
        feature_thresholds=per_feature,
        drift_share=share,
        workers=1,
    )
    return {
        "rows": len(current),
        "reference": prepared.source,
        "drifted": result.drifted if result.share_drifted is not None else None,
        "share_drifted": result.share_drifted,
        "result": (full := result.as_dict()),
        "summary": drift_summary(full),
        "histograms": histograms(prepared, current),
    }


# ---------------------------------------------------------------------------------------------
# Refresh


@dataclass
class RefreshResult:
    hours: int = 0
    days: int = 0
    drift_windows: int = 0


def refresh_window(endpoint_id: int, version: ModelVersion, hour: datetime) -> None:
    """Recompute one hour, its day, and the drift of both."""
    _save_rollup(
        endpoint_id, version.pk, Granularity.HOUR, hour, compute_hour(endpoint_id, version, hour)
    )
    day = floor_day(hour)
    hours = Rollup.objects.filter(
        endpoint_id=endpoint_id,
        model_version=version,
        granularity=Granularity.HOUR,
        window_start__gte=day,
        window_start__lt=day + DAY,
    )
    _save_rollup(endpoint_id, version.pk, Granularity.DAY, day, merge_rollups(hours))


def refresh_drift(
    endpoint_id: int, version: ModelVersion, granularity: str, start: datetime
) -> None:
    fields = compute_drift_window(endpoint_id, version, granularity, start)
    key = dict(
        endpoint_id=endpoint_id, model_version=version, granularity=granularity, window_start=start
    )
    if not fields["rows"]:
        DriftRollup.objects.filter(**key).delete()
        return
    DriftRollup.objects.update_or_create(**key, defaults={**fields, "computed_at": timezone.now()})


def rollups_refresh(*, limit: int = 5000, with_drift: bool = True) -> RefreshResult:
    """Recompute every stale hour (at most ``limit`` per call, oldest first), the days they
    belong to and the drift of both; clear the marks that did not change meanwhile."""
    marks = list(
        StaleWindow.objects.order_by("hour").values_list(
            "pk", "endpoint_id", "model_version_id", "hour", "marked_at"
        )[:limit]
    )
    result = RefreshResult()
    if not marks:
        return result
    versions = ModelVersion.objects.select_related("registered_model").in_bulk(
        {m[2] for m in marks}
    )
    days: set[tuple[int, int, datetime]] = set()
    for _, endpoint_id, version_id, hour, _ in marks:
        version = versions[version_id]
        with transaction.atomic():
            refresh_window(endpoint_id, version, hour)
        result.hours += 1
        days.add((endpoint_id, version_id, floor_day(hour)))
        if with_drift:
            refresh_drift(endpoint_id, version, Granularity.HOUR, hour)
            result.drift_windows += 1
    result.days = len(days)
    if with_drift:
        for endpoint_id, version_id, day in sorted(days):
            refresh_drift(endpoint_id, versions[version_id], Granularity.DAY, day)
            result.drift_windows += 1
    for start in range(0, len(marks), 200):  # bounded SQL expressions
        done = Q(pk__in=[])
        for pk, *_, marked_at in marks[start : start + 200]:
            done |= Q(pk=pk, marked_at=marked_at)
        StaleWindow.objects.filter(done).delete()
    return result


# ---------------------------------------------------------------------------------------------
# Rebuild (backfill): set-based on PostgreSQL

#: Whether a JSON label counts as the positive class, as ``metrics.label_key(label) in ("1",
#: "true")`` decides it in :func:`compute_hour`.
_POSITIVE_SQL = """
    CASE WHEN jsonb_typeof(g.label) = 'number' THEN g.label::numeric = 1
         ELSE g.label IN ('true'::jsonb, '"1"'::jsonb, '"true"'::jsonb) END"""

_FINITE = "NOT IN ('NaN'::float8, 'Infinity'::float8, '-Infinity'::float8)"

#: One scan of one version's rows: per hour, the counts (grouping set 0), the latency buckets of
#: first rows (1), the (label, prediction) pairs of labeled rows (2) and the score bins of labeled
#: rows by class (3). Bucket i of LATENCY_BOUNDS_MS b holds the values with b[i-1] < v <= b[i]
#: (numpy's ``searchsorted(side="left")``): the number of bounds < v, i.e. 200 minus the number of
#: negated bounds <= -v, which ``width_bucket`` counts exactly (no logarithms, no rounding).
_REBUILD_SQL = f"""
WITH r AS (
    SELECT date_trunc('hour', p.created_at AT TIME ZONE 'UTC') AS hour,
           p.row_index = 0 AS first_row,
           CASE WHEN p.row_index = 0 AND p.latency_ms {_FINITE}
                THEN %(n_bounds)s - width_bucket(-p.latency_ms, %(negated_bounds)s::float8[])
           END AS latency_bucket,
           g.id IS NOT NULL AS labeled,
           CASE WHEN g.id IS NOT NULL THEN g.label::text END AS label,
           CASE WHEN g.id IS NOT NULL THEN p.prediction::text END AS prediction,
           CASE WHEN g.id IS NOT NULL AND p.score {_FINITE}
                THEN least(%(score_bins)s - 1, greatest(0, trunc(p.score * %(score_bins)s)))::int
           END AS score_bin,
           CASE WHEN g.id IS NOT NULL THEN {_POSITIVE_SQL} END AS positive,
           p.score IS NOT NULL AS has_score,
           CASE WHEN jsonb_typeof(g.label) = 'number' AND jsonb_typeof(p.prediction) = 'number'
                THEN g.label::float8 - p.prediction::float8 END AS residual
      FROM rollouts_predictionlog p
      LEFT JOIN monitoring_groundtruth g ON g.prediction_id = p.id
     WHERE p.endpoint_id = %(endpoint)s AND p.model_version_id = %(version)s
       AND p.created_at >= %(start)s AND p.created_at < %(end)s
)
SELECT hour,
       GROUPING(latency_bucket, label, prediction, positive, score_bin) AS grouping_set,
       latency_bucket, label, prediction, positive, score_bin,
       count(*), count(*) FILTER (WHERE first_row), count(*) FILTER (WHERE labeled),
       count(*) FILTER (WHERE labeled AND has_score),
       count(residual), coalesce(sum(residual * residual), 0), coalesce(sum(abs(residual)), 0)
  FROM r
 GROUP BY GROUPING SETS ((hour), (hour, latency_bucket), (hour, label, prediction),
                         (hour, positive, score_bin))
"""
# GROUPING(...) is a bit mask over its arguments, first argument highest: 0b11111 = 31 for
# (hour), 0b01111 = 15 for (hour, latency_bucket), 0b10011 = 19 for (hour, label, prediction),
# 0b11100 = 28 for (hour, positive, score_bin).
_SET_HOUR, _SET_LATENCY, _SET_CONFUSION, _SET_SCORE = 31, 15, 19, 28

_ROLLUP_FIELDS = (
    "requests",
    "rows",
    "errors",
    "latency_hist",
    "labeled",
    "task",
    "confusion",
    "score_pos_hist",
    "score_neg_hist",
    "squared_error_sum",
    "absolute_error_sum",
)


def _utc_hour(naive: datetime) -> datetime:
    return naive.replace(tzinfo=UTC) if timezone.is_naive(naive) else naive


def _rebuild_hours_sql(
    endpoint_id: int, version: ModelVersion, start: datetime, end: datetime
) -> dict[datetime, dict[str, Any]]:
    """:func:`compute_hour` of every hour of [start, end) that has rows or errors, in one
    scan of the version's rows (PostgreSQL)."""
    task = version_task(version)
    hours: dict[datetime, dict[str, Any]] = {}
    latency: dict[datetime, np.ndarray] = {}
    pos: dict[datetime, np.ndarray] = {}
    neg: dict[datetime, np.ndarray] = {}
    confusion: dict[datetime, metrics.Confusion] = {}
    scored: dict[datetime, bool] = {}

    def hour_of(naive: datetime) -> dict[str, Any]:
        hour = _utc_hour(naive)
        if hour not in hours:
            hours[hour] = {
                "requests": 0,
                "rows": 0,
                "errors": 0,
                "labeled": 0,
                "task": task,
                "squared_error_sum": 0.0,
                "absolute_error_sum": 0.0,
            }
            latency[hour] = np.zeros(metrics.LATENCY_BUCKETS, dtype=np.int64)
            pos[hour] = np.zeros(metrics.SCORE_BINS, dtype=np.int64)
            neg[hour] = np.zeros(metrics.SCORE_BINS, dtype=np.int64)
            confusion[hour] = metrics.Confusion()
            scored[hour] = False
        return hours[hour]

    params = {
        "endpoint": endpoint_id,
        "version": version.pk,
        "start": start,
        "end": end,
        "n_bounds": len(metrics.LATENCY_BOUNDS_MS),
        "negated_bounds": [float(-b) for b in metrics.LATENCY_BOUNDS_MS[::-1]],
        "score_bins": metrics.SCORE_BINS,
    }
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL work_mem = '256MB'")
        cursor.execute(_REBUILD_SQL, params)
        for (
            naive,
            grouping_set,
            bucket,
            label,
            prediction,
            positive,
            score_bin,
            n,
            first_rows,
            labeled,
            labeled_scored,
            residuals,
            sq,
            ab,
        ) in cursor.fetchall():
            fields = hour_of(naive)
            hour = _utc_hour(naive)
            if grouping_set == _SET_HOUR:
                fields["rows"] = n
                fields["requests"] = first_rows
                if task == "regression":
                    fields["labeled"] = residuals
                    fields["squared_error_sum"] = float(sq)
                    fields["absolute_error_sum"] = float(ab)
                else:
                    fields["labeled"] = labeled
                    scored[hour] = labeled_scored > 0
            elif grouping_set == _SET_LATENCY and bucket is not None:
                latency[hour][bucket] += n
            elif grouping_set == _SET_CONFUSION and label is not None and task != "regression":
                confusion[hour].add(json.loads(label), json.loads(prediction), n)
            elif grouping_set == _SET_SCORE and score_bin is not None and task != "regression":
                (pos if positive else neg)[hour][score_bin] += n
        cursor.execute(
            """
            SELECT date_trunc('hour', created_at AT TIME ZONE 'UTC'), count(*)
              FROM rollouts_servingerror
             WHERE endpoint_id = %s AND model_version_id = %s
               AND created_at >= %s AND created_at < %s
             GROUP BY 1
            """,
            [endpoint_id, version.pk, start, end],
        )
        for naive, n in cursor.fetchall():
            hour_of(naive)["errors"] = n
    for hour, fields in hours.items():
        fields["latency_hist"] = np.trim_zeros(latency[hour], trim="b").tolist()
        fields["confusion"] = confusion[hour].counts
        fields["score_pos_hist"] = pos[hour].tolist() if scored[hour] else []
        fields["score_neg_hist"] = neg[hour].tolist() if scored[hour] else []
    return hours


def _rebuild_hours_python(
    endpoint_id: int, version: ModelVersion, start: datetime, end: datetime
) -> dict[datetime, dict[str, Any]]:
    """The same as :func:`_rebuild_hours_sql`, hour by hour with :func:`compute_hour`."""
    found: set[datetime] = set()
    for model in (PredictionLog, ServingError):
        found.update(
            floor_hour(t)
            for t in model.objects.filter(
                endpoint_id=endpoint_id,
                model_version=version,
                created_at__gte=start,
                created_at__lt=end,
            ).values_list("created_at", flat=True)
        )
    return {hour: compute_hour(endpoint_id, version, hour) for hour in sorted(found)}


def rollups_rebuild(endpoint_id: int, start: datetime, end: datetime) -> RefreshResult:
    """Recompute the hour rollups of every version of an endpoint in [start, end) (whole hours)
    and the day rollups of the days they touch, as :func:`refresh_window` would hour by hour,
    for a backfill. On PostgreSQL one set-based query per version computes every hour (equal to
    :func:`compute_hour`, tested); elsewhere each hour is computed in Python. Hour rollups in
    the range without rows or errors are deleted; stale marks in the range made before the
    rebuild began are cleared. Drift rollups are not touched."""
    began = timezone.now()
    start = floor_hour(start)
    end = floor_hour(end) + (HOUR if end != floor_hour(end) else timedelta(0))
    endpoint = Endpoint.objects.get(pk=endpoint_id)
    versions = ModelVersion.objects.filter(registered_model_id=endpoint.registered_model_id)
    rebuild = _rebuild_hours_sql if connection.vendor == "postgresql" else _rebuild_hours_python
    result = RefreshResult()
    for version in versions.select_related("registered_model"):
        hours = rebuild(endpoint_id, version, start, end)
        existing = Rollup.objects.filter(
            endpoint_id=endpoint_id,
            model_version=version,
            granularity=Granularity.HOUR,
            window_start__gte=start,
            window_start__lt=end,
        )
        days = {floor_day(h) for h in hours} | {
            floor_day(h) for h in existing.values_list("window_start", flat=True)
        }
        now = timezone.now()
        with transaction.atomic():
            existing.exclude(window_start__in=list(hours)).delete()
            Rollup.objects.bulk_create(
                [
                    Rollup(
                        endpoint_id=endpoint_id,
                        model_version=version,
                        granularity=Granularity.HOUR,
                        window_start=hour,
                        computed_at=now,
                        **fields,
                    )
                    for hour, fields in hours.items()
                ],
                batch_size=500,
                update_conflicts=True,
                unique_fields=["endpoint", "model_version", "granularity", "window_start"],
                update_fields=[*_ROLLUP_FIELDS, "computed_at"],
            )
            for day in sorted(days):
                parts = Rollup.objects.filter(
                    endpoint_id=endpoint_id,
                    model_version=version,
                    granularity=Granularity.HOUR,
                    window_start__gte=day,
                    window_start__lt=day + DAY,
                )
                _save_rollup(endpoint_id, version.pk, Granularity.DAY, day, merge_rollups(parts))
        result.hours += len(hours)
        result.days += len(days)
    StaleWindow.objects.filter(
        endpoint_id=endpoint_id, hour__gte=start, hour__lt=end, marked_at__lt=began
    ).delete()
    return result

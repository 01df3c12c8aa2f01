"""Reads of the monitoring app: per-version figures of an endpoint, from the prediction log
joined with ground truth."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from rollouts.models import Endpoint, PredictionLog

WINDOWS = {"minute": "min", "hour": "h", "day": "D"}


@dataclass(frozen=True)
class VersionStats:
    version: int
    requests: int
    rows: int
    labeled: int
    correct: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    first_seen: datetime | None
    last_seen: datetime | None

    @property
    def accuracy(self) -> float | None:
        """Share of labeled rows whose prediction equals the label; None with no labels."""
        return self.correct / self.labeled if self.labeled else None

    @property
    def label_coverage(self) -> float | None:
        return self.labeled / self.rows if self.rows else None


def label_matches(prediction: Any, label: Any) -> bool:
    """Equality of a logged prediction and its label; numbers compare by value (1 == 1.0)."""
    numeric = (int, float)
    if (
        isinstance(prediction, numeric)
        and isinstance(label, numeric)
        and not isinstance(prediction, bool)
        and not isinstance(label, bool)
    ):
        return math.isclose(float(prediction), float(label), rel_tol=0.0, abs_tol=0.0)
    return prediction == label


def prediction_frame(endpoint: Endpoint) -> pd.DataFrame:
    """One row per logged prediction: version, request_id, created_at, latency_ms, labeled,
    correct. An empty frame (with those columns) when nothing is logged."""
    rows = PredictionLog.objects.filter(endpoint=endpoint).values_list(
        "model_version__version",
        "request_id",
        "created_at",
        "latency_ms",
        "prediction",
        "ground_truth__label",
        "ground_truth__id",
    )
    records = [
        (
            version,
            request_id,
            created_at,
            latency,
            gt_id is not None,
            gt_id is not None and label_matches(pred, label),
        )
        for version, request_id, created_at, latency, pred, label, gt_id in rows.iterator(
            chunk_size=5000
        )
    ]
    return pd.DataFrame.from_records(
        records, columns=["version", "request_id", "created_at", "latency_ms", "labeled", "correct"]
    )


def _percentile(values: pd.Series, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def version_stats(endpoint: Endpoint, frame: pd.DataFrame | None = None) -> list[VersionStats]:
    """Per version: requests, rows, labeled rows, accuracy and request latency p50/p95."""
    frame = prediction_frame(endpoint) if frame is None else frame
    stats = []
    for version, group in frame.groupby("version", sort=True):
        per_request = group.drop_duplicates("request_id")
        stats.append(
            VersionStats(
                version=int(version),
                requests=len(per_request),
                rows=len(group),
                labeled=int(group["labeled"].sum()),
                correct=int(group["correct"].sum()),
                latency_p50_ms=_percentile(per_request["latency_ms"], 50),
                latency_p95_ms=_percentile(per_request["latency_ms"], 95),
                first_seen=group["created_at"].min().to_pydatetime(),
                last_seen=group["created_at"].max().to_pydatetime(),
            )
        )
    return stats


def pick_window(frame: pd.DataFrame, wanted: str | None) -> str:
    """``wanted`` if it is a known window, else the finest that keeps the chart readable."""
    if wanted in WINDOWS:
        return wanted
    if frame.empty:
        return "hour"
    span = frame["created_at"].max() - frame["created_at"].min()
    if span <= pd.Timedelta(hours=3):
        return "minute"
    return "hour" if span <= pd.Timedelta(days=7) else "day"


def time_series(frame: pd.DataFrame, window: str) -> pd.DataFrame:
    """Per version and window: requests, p50/p95 latency, labeled rows and accuracy (NaN when a
    window has no labels)."""
    columns = ["version", "window", "requests", "p50", "p95", "labeled", "accuracy"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame.assign(window=frame["created_at"].dt.floor(WINDOWS[window]))
    per_request = frame.drop_duplicates("request_id")
    latency = per_request.groupby(["version", "window"])["latency_ms"]
    labels = frame.groupby(["version", "window"]).agg(
        labeled=("labeled", "sum"), correct=("correct", "sum")
    )
    out = pd.DataFrame(
        {
            "requests": latency.size(),
            "p50": latency.quantile(0.5),
            "p95": latency.quantile(0.95),
        }
    ).join(labels)
    out["accuracy"] = np.where(
        out["labeled"] > 0, out["correct"] / out["labeled"].where(out["labeled"] > 0), np.nan
    )
    return out.reset_index()[columns]

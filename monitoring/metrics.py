"""Model-quality and latency figures from mergeable counts.

Pure numpy: no Django. Every figure is computed from sums that add up across windows (an hour's
counts plus the next hour's are the two hours' counts), so a day is the merge of its hours and
no page reads the raw prediction log:

* latency: a histogram on fixed log-spaced buckets (:data:`LATENCY_BOUNDS_MS`);
* classification: the confusion matrix over every label seen, and for binary classifiers two
  histograms of the logged positive-class scores, one for true positives' rows and one for
  true negatives' rows (:data:`SCORE_BINS` equal bins on [0, 1]);
* regression: the number of labeled rows and the sums of squared and absolute errors.

A figure that is undefined (no labels yet, one class only, no predicted positives) is ``None``
with the reason in ``undefined``, never 0 and never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Upper bounds of the latency buckets, milliseconds: 0.1 ms × 2^(i/8), i = 0…199 (up to about
#: 3.1 million ms), plus a last bucket for anything above. Eight buckets per doubling bound
#: the relative error of an interpolated percentile by 2^(1/8) - 1 ≈ 9 %.
LATENCY_BOUNDS_MS = 0.1 * np.power(2.0, np.arange(200) / 8.0)
LATENCY_BUCKETS = len(LATENCY_BOUNDS_MS) + 1

#: Equal-width score bins on [0, 1] for ROC AUC. Scores that share a bin count as ties (half a
#: concordant pair), so the AUC is exact when no positive and negative share a bin, and off by at
#: most half the share of positive-negative pairs that share a bin otherwise. 200 bins keep a
#: 90-day page's merge to a few hundred thousand counts.
SCORE_BINS = 200


def latency_histogram(latencies_ms: Iterable[float]) -> list[int]:
    """Counts per bucket of :data:`LATENCY_BOUNDS_MS`; a value lands in the first bucket whose
    upper bound is ``>=`` it. Non-finite values are skipped. Trailing empty buckets are left
    off (at most :data:`LATENCY_BUCKETS` entries; a missing bucket counts 0)."""
    values = np.asarray(list(latencies_ms), dtype=float)
    values = values[np.isfinite(values)]
    index = np.searchsorted(LATENCY_BOUNDS_MS, values, side="left")
    counts = np.bincount(index, minlength=1).astype(int)
    return np.trim_zeros(counts, trim="b").tolist()


def add_histograms(total: np.ndarray, part: Sequence[int]) -> np.ndarray:
    """``total + part`` for histograms that may have left off different trailing zeros."""
    if len(part) > len(total):
        total = np.pad(total, (0, len(part) - len(total)))
    total[: len(part)] += np.asarray(part, dtype=total.dtype)
    return total


def latency_percentile(histogram: Sequence[int], q: float) -> float | None:
    """The ``q``-th percentile (0–100) of a latency histogram, in ms; None when it is empty.

    Log-linear interpolation inside the bucket that holds the rank (as Prometheus'
    ``histogram_quantile`` does linearly); the top bucket reports its lower bound."""
    counts = np.asarray(histogram, dtype=float)
    total = counts.sum()
    if total <= 0:
        return None
    rank = q / 100.0 * total
    cumulative = np.cumsum(counts)
    i = int(np.searchsorted(cumulative, rank, side="left"))
    i = min(i, len(counts) - 1)
    if i >= len(LATENCY_BOUNDS_MS):
        return float(LATENCY_BOUNDS_MS[-1])
    upper = LATENCY_BOUNDS_MS[i]
    lower = LATENCY_BOUNDS_MS[i - 1] if i > 0 else 0.0
    below = cumulative[i - 1] if i > 0 else 0.0
    fraction = (rank - below) / counts[i] if counts[i] else 1.0
    if lower <= 0:
        return float(upper * fraction)
    return float(lower * (upper / lower) ** fraction)


def score_histograms(scores: Iterable[float | None], positive: Iterable[bool]) -> tuple[list, list]:
    """(positives' histogram, negatives' histogram) of scores on :data:`SCORE_BINS` bins; rows
    without a finite score are skipped, scores are clipped to [0, 1]."""
    pos = np.zeros(SCORE_BINS, dtype=int)
    neg = np.zeros(SCORE_BINS, dtype=int)
    for score, is_positive in zip(scores, positive, strict=True):
        if score is None or not math.isfinite(score):
            continue
        b = min(SCORE_BINS - 1, max(0, int(score * SCORE_BINS)))
        (pos if is_positive else neg)[b] += 1
    return pos.tolist(), neg.tolist()


def roc_auc_from_histograms(pos: Sequence[int], neg: Sequence[int]) -> float | None:
    """Area under the ROC curve = P(score of a positive > score of a negative) + ½ P(tie)
    (Hanley & McNeil 1982), with scores binned (ties within a bin). None when either class has
    no scored row."""
    p = np.asarray(pos, dtype=float)
    n = np.asarray(neg, dtype=float)
    n_pos, n_neg = p.sum(), n.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    negatives_below = np.concatenate([[0.0], np.cumsum(n)[:-1]])
    concordant = float((p * negatives_below).sum() + 0.5 * (p * n).sum())
    return concordant / (n_pos * n_neg)


def label_key(value: Any) -> str:
    """The text under which a label or prediction is counted: numbers by value (1 and 1.0 are
    one class), everything else by its JSON-ish text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    return str(value)


@dataclass
class Confusion:
    """Counts of (true label, predicted label) pairs; ``labels`` sorted, ``matrix[i][j]`` the
    rows whose label is ``labels[i]`` and prediction ``labels[j]``."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, label: Any, prediction: Any, n: int = 1) -> None:
        row = self.counts.setdefault(label_key(label), {})
        key = label_key(prediction)
        row[key] = row.get(key, 0) + n

    def merge(self, other: dict[str, dict[str, int]]) -> None:
        for label, row in other.items():
            for prediction, n in row.items():
                mine = self.counts.setdefault(label, {})
                mine[prediction] = mine.get(prediction, 0) + n

    @property
    def labels(self) -> list[str]:
        seen = set(self.counts)
        for row in self.counts.values():
            seen.update(row)
        return sorted(seen, key=class_order)

    @property
    def matrix(self) -> list[list[int]]:
        labels = self.labels
        return [[self.counts.get(t, {}).get(p, 0) for p in labels] for t in labels]


def class_order(key: str) -> tuple:
    """Sort key of class texts: numbers first, by value, then the rest alphabetically."""
    number = _is_number(key)
    return (not number, float(key) if number else 0.0, key)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


#: Label sets read as binary with the second one positive (scikit-learn's ``pos_label=1``).
BINARY_LABELS = ({"0", "1"}, {"false", "true"})


@dataclass
class Quality:
    """Quality figures of one window. ``undefined`` maps a figure's name to why it is None."""

    labeled: int = 0
    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1: float | None = None
    roc_auc: float | None = None
    rmse: float | None = None
    mae: float | None = None
    average: str = ""
    per_class: list[dict[str, Any]] = field(default_factory=list)
    undefined: dict[str, str] = field(default_factory=dict)


def classification_quality(
    confusion: Confusion,
    score_pos: Sequence[int] | None = None,
    score_neg=None,
    *,
    classes: Sequence[str] | None = None,
) -> Quality:
    """Accuracy, precision, recall, F1 and (binary, scores logged) ROC AUC.

    ``classes``: the classes the model knows (:func:`label_key` texts, e.g. from
    ``monitoring.rollups.version_classes``); the figures are computed over them and any other
    label seen, so a window that happens to hold two of three classes is still judged as a
    three-class model. Without ``classes``, the labels seen are all there is.

    A binary model (its classes, or else the labels seen, within {0, 1} or {false, true})
    reports the positive class, as scikit-learn's ``average="binary"``; any other reports the
    macro average over its classes, leaving out a class whose figure is undefined (no row
    predicted or labeled as it), as scikit-learn's ``zero_division=np.nan`` does.
    ``per_class`` lists, for every class, ``{"label", "precision", "recall", "f1",
    "support"}`` (support: labeled rows of the class; None where undefined).

    Formulas: precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2PR / (P + R).
    """
    seen = confusion.labels
    known = sorted(set(classes), key=class_order) if classes else []
    labels = sorted(set(seen) | set(known), key=class_order)
    matrix = np.asarray(
        [[confusion.counts.get(t, {}).get(p, 0) for p in labels] for t in labels], dtype=float
    ).reshape(len(labels), len(labels))
    total = matrix.sum()
    q = Quality(labeled=int(total))
    for i, label in enumerate(labels):
        precision, recall, f1 = _class_figures(matrix, i, {})
        q.per_class.append(
            {
                "label": label,
                "precision": precision,
                "recall": recall,
                "f1": f1,
                "support": int(matrix[i, :].sum()),
            }
        )
    if total == 0:
        reason = "no labeled predictions yet"
        q.undefined = {k: reason for k in ("accuracy", "precision", "recall", "f1", "roc_auc")}
        return q
    q.accuracy = float(np.trace(matrix) / total)
    model_classes = known or labels
    binary = len(model_classes) <= 2 and any(set(model_classes) <= pair for pair in BINARY_LABELS)
    if binary:
        q.average = "binary"
        positive = "1" if "1" in labels or "0" in labels else "true"
        positive_index = [labels.index(positive)] if positive in labels else []
        if not positive_index:
            for name in ("precision", "recall", "f1"):
                q.undefined[name] = "no row is labeled or predicted positive"
            q.precision = q.recall = q.f1 = None
        else:
            q.precision, q.recall, q.f1 = _class_figures(matrix, positive_index[0], q.undefined)
    else:
        q.average = "macro"
        for name in ("precision", "recall", "f1"):
            defined = [c[name] for c in q.per_class if c[name] is not None]
            value = float(np.mean(defined)) if defined else None
            setattr(q, name, value)
            if value is None:
                q.undefined[name] = "undefined for every class"
    if score_pos is None or score_neg is None or not binary:
        q.undefined["roc_auc"] = (
            "needs binary labels" if not binary else "the model's scores are not logged"
        )
    else:
        q.roc_auc = roc_auc_from_histograms(score_pos, score_neg)
        if q.roc_auc is None:
            q.undefined["roc_auc"] = "needs labeled, scored rows of both classes"
    return q


def _class_figures(matrix: np.ndarray, i: int, undefined: dict[str, str]):
    tp = matrix[i, i]
    predicted = matrix[:, i].sum()
    actual = matrix[i, :].sum()
    precision = tp / predicted if predicted else None
    recall = tp / actual if actual else None
    if precision is None:
        undefined["precision"] = "no row was predicted positive"
    if recall is None:
        undefined["recall"] = "no labeled row is positive"
    if precision is None or recall is None:
        f1 = None
        undefined["f1"] = "precision or recall is undefined"
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return (
        None if precision is None else float(precision),
        None if recall is None else float(recall),
        None if f1 is None else float(f1),
    )


def regression_quality(
    labeled: int, squared_error_sum: float, absolute_error_sum: float
) -> Quality:
    """RMSE = sqrt(Σ(y - ŷ)² / n) and MAE = Σ|y - ŷ| / n over ``labeled`` rows."""
    q = Quality(labeled=labeled)
    if labeled == 0:
        q.undefined = {"rmse": "no labeled predictions yet", "mae": "no labeled predictions yet"}
        return q
    q.rmse = math.sqrt(squared_error_sum / labeled)
    q.mae = absolute_error_sum / labeled
    return q

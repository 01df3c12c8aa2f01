"""Data and prediction drift between a reference sample and a current window.

Pure numpy/scipy: no Django, no database. The work is split in two so that one reference serves
many windows:

* :func:`prepare_reference` sorts each reference column once and keeps what every comparison
  needs (quantile edges, standard deviation, a grid of reference quantiles, category counts).
* :func:`compute_drift` compares a current window against it, one feature per task on a thread
  pool (``np.sort`` and ``np.searchsorted`` release the GIL), and returns a :class:`DatasetDrift`
  whose :meth:`DatasetDrift.as_dict` is JSON-safe (``None`` where a figure is undefined, never
  NaN or infinity).

Numeric features get PSI, the two-sample Kolmogorov–Smirnov statistic and the Wasserstein-1
distance divided by the reference standard deviation; categorical features get PSI over
categories, Pearson's chi-square on the 2×k table and the Jensen–Shannon distance. Missing values
(NaN, None) and, for numeric features, ±inf are left out of the distributions and reported as
shares of all rows. The model's output column ("prediction drift") goes through the same code.

A verdict needs both an effect and evidence (so that small samples do not cry wolf: 300 vs 200
rows of one normal distribution give a normalised Wasserstein distance of about 0.15 by chance
alone). A feature drifts when an effect size reaches its threshold (PSI, normalised
Wasserstein, Jensen–Shannon; :class:`Thresholds`) **and** the test of "no drift" rejects: the
two-sample Kolmogorov–Smirnov test for numeric features (:func:`ks_pvalue`), Pearson's
chi-square test of homogeneity for categorical ones (:func:`chi_square`), with the p-values of
all the columns of one window adjusted together by the Benjamini–Hochberg procedure
(:func:`benjamini_hochberg`; Benjamini & Hochberg 1995, "Controlling the false discovery rate",
JRSS B 57(1)) and compared with ``alpha`` (:data:`ALPHA`). Fewer than ``min_rows`` usable values
on either side is "insufficient data". Date and time columns (datetime dtypes, or text that is
all ISO 8601 dates) are ``skipped`` with a reason: every timestamp of a new window is new, so
comparing them as categories would always drift, and as numbers would only say that time
passed.

Small samples are compared exactly (the KS statistic and the Wasserstein distance equal
``scipy.stats.ks_2samp`` and ``scipy.stats.wasserstein_distance``); once the reference and the
current window together hold more than ``exact_limit`` usable values, both are computed on a grid
of ``GRID_SIZE`` reference quantiles, with the error bounds given in
:func:`kolmogorov_smirnov` and :func:`wasserstein_normalised`.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import numpy as np
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency, ks_2samp, kstwo, kstwobign

#: Floor applied to bin proportions before PSI, so that an empty bin gives a large but finite
#: term. 1e-4 is the usual choice in credit-scoring practice (Yurdakul 2018, "Statistical
#: properties of the population stability index", Western Michigan University; Siddiqi 2006,
#: "Credit Risk Scorecards").
PSI_EPS = 1e-4

#: Number of PSI bins on numeric features: edges at the reference deciles.
PSI_BINS = 10

#: Reference quantiles used by the large-sample KS and Wasserstein computations.
GRID_SIZE = 4096

#: Above this many usable values (reference + current) KS and Wasserstein use the grid.
EXACT_LIMIT = 200_000

#: Fewer usable values than this on either side gives "insufficient data".
MIN_ROWS = 30

#: Significance level of the drift tests, after the Benjamini–Hochberg adjustment across the
#: columns of one window: a feature drifts only when its adjusted p-value (q-value) is below it.
ALPHA = 0.01

#: Up to this many values on the larger side, the KS p-value is scipy's exact one
#: (``scipy.stats.ks_2samp``, method "auto", whose own limit this is; about 20 ms at 10,000).
KS_EXACT_N = 10_000

#: Above KS_EXACT_N, the KS p-value is scipy's asymptotic one, ``kstwo.sf(D, round(en))`` with
#: en = n·m/(n+m) (as ``ks_2samp(method="asymp")``), while en is at most this; beyond it,
#: ``kstwo.sf`` takes 0.1–1 s per call (0.17 s at en = 90,909), so the limiting Kolmogorov
#: distribution ``kstwobign.sf(D·sqrt(en))`` is used instead (Smirnov 1948; within 1 % of
#: kstwo there in relative terms for p above 1e-30).
KS_KSTWO_LIMIT = 10_000

#: Dataset drift when at least this share of the evaluated features drifted.
DRIFT_SHARE = 0.5

#: How many unseen categories are listed by name; the count and the share cover all of them.
MAX_LISTED_CATEGORIES = 20


class Status(StrEnum):
    OK = "ok"
    WARNING = "warning"
    DRIFT = "drift"
    INSUFFICIENT = "insufficient data"
    SKIPPED = "skipped"


#: Statuses of a feature that was judged (counted in the dataset's drift share).
EVALUATED = frozenset({Status.OK, Status.WARNING, Status.DRIFT})


@dataclass(frozen=True)
class Thresholds:
    """Limits that turn figures into a status; each is compared with ``>=``.

    ``psi_warning``/``psi_drift`` apply to numeric and categorical features, ``wasserstein`` to
    the normalised Wasserstein distance (numeric), ``jensen_shannon`` to the Jensen–Shannon
    distance with base 2 (categorical). ``missing_change`` is the absolute change in the share of
    missing values that gives a warning. Raises ``ValueError`` on negative limits or when
    ``psi_warning > psi_drift``.
    """

    psi_warning: float = 0.1
    psi_drift: float = 0.25
    wasserstein: float = 0.1
    jensen_shannon: float = 0.1
    missing_change: float = 0.1

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"threshold {name} must be a finite number >= 0, got {value!r}")
        if self.psi_warning > self.psi_drift:
            raise ValueError("psi_warning must not exceed psi_drift")


DEFAULT_THRESHOLDS = Thresholds()


# ---------------------------------------------------------------------------------------------
# Reference


@dataclass(frozen=True, eq=False)
class NumericReference:
    """One numeric reference column, precomputed. Arrays are read-only.

    ``values``: sorted finite values, shape (n,). ``psi_edges``: from :func:`psi_edges`.
    ``psi_counts``: reference counts in the ``len(psi_edges) + 1`` bins
    ``(-inf, e0), [e0, e1), …, [e_last, +inf)``. ``unique``/``count_below``/``count_upto``: the
    distinct values and, for each, how many values are ``<`` and ``<=`` it. ``grid``: indices into
    ``unique`` used by the large-sample KS. ``cell_integrals``: ∫ (Q(u) - center) du over the
    ``GRID_SIZE`` equal cells of [0, 1], Q the reference quantile function.
    """

    name: str
    n_rows: int
    n_missing: int
    n_inf: int
    values: np.ndarray
    std: float | None
    center: float
    psi_edges: np.ndarray
    psi_counts: np.ndarray
    unique: np.ndarray
    count_below: np.ndarray
    count_upto: np.ndarray
    grid: np.ndarray
    cell_integrals: np.ndarray | None

    kind = "numeric"


@dataclass(frozen=True, eq=False)
class CategoricalReference:
    """One categorical reference column: counts per category (keys as in
    :func:`category_counts`)."""

    name: str
    n_rows: int
    n_missing: int
    counts: dict[str, int]

    kind = "categorical"


@dataclass(frozen=True, eq=False)
class DatetimeReference:
    """A date or time column of the reference: not compared (status ``skipped``), see the
    module docstring."""

    name: str
    n_rows: int
    n_missing: int

    kind = "datetime"


@dataclass(frozen=True, eq=False)
class Reference:
    """The prepared reference: one entry per column, plus which column is the model output."""

    columns: dict[str, NumericReference | CategoricalReference | DatetimeReference]
    prediction: str | None = None

    @property
    def n_rows(self) -> int:
        return max((c.n_rows for c in self.columns.values()), default=0)


def prepare_reference(
    data: Any,
    *,
    categorical: Iterable[str] = (),
    prediction: str | None = None,
    columns: Iterable[str] | None = None,
    workers: int | None = None,
) -> Reference:
    """Precompute a reference sample once, to compare many windows against it.

    ``data`` is a pandas DataFrame or a mapping of column name to a 1-D array-like (equal lengths
    are not required). Columns named in ``categorical`` are categorical; of the others, numeric
    and all-missing columns are numeric, date/time columns (datetime dtypes, ``date``/``datetime``
    objects, or text that is all ISO 8601 dates) are datetime and skipped, other
    bool/str/object columns are categorical. ``prediction``
    names the model-output column: it is compared like a feature but reported as prediction drift
    and not counted in the dataset drift share. ``columns`` limits which columns are used;
    ``workers`` (default: the number of CPUs) sets the thread pool.

    Raises ``KeyError`` for a named column that is not in ``data`` and ``ValueError`` for a
    column that is not one-dimensional.
    """
    names = list(columns) if columns is not None else [str(c) for c in _column_names(data)]
    categorical = set(categorical)
    if prediction is not None and prediction not in names:
        names.append(prediction)

    def one(name: str) -> NumericReference | CategoricalReference | DatetimeReference:
        raw = _column(data, name)
        if _looks_datetime(raw):
            return _prepare_datetime(name, raw)
        if name in categorical or _looks_categorical(raw):
            return _prepare_categorical(name, raw)
        return _prepare_numeric(name, raw)

    prepared = dict(zip(names, _map(one, names, workers), strict=True))
    return Reference(columns=prepared, prediction=prediction)


def _map(func: Any, names: list[str], workers: int | None) -> list[Any]:
    """``[func(n) for n in names]`` on a thread pool: the numpy work releases the GIL."""
    workers = min(workers or os.cpu_count() or 1, len(names))
    if workers <= 1:
        return [func(name) for name in names]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(func, names))


def _column_names(data: Any) -> list[Any]:
    if hasattr(data, "columns"):
        return list(data.columns)
    if isinstance(data, Mapping):
        return list(data.keys())
    raise TypeError("data must be a pandas DataFrame or a mapping of column name to values")


def _column(data: Any, name: str) -> Any:
    try:
        return data[name]
    except (KeyError, IndexError):
        raise KeyError(f"column {name!r} is not in the data") from None


def _looks_categorical(raw: Any) -> bool:
    dtype = getattr(raw, "dtype", None)
    if dtype is None:
        raw = np.asarray(raw, dtype=object) if isinstance(raw, list | tuple) else np.asarray(raw)
        dtype = raw.dtype
    kind = getattr(dtype, "kind", "O")
    if kind in "iuf":
        return False
    if kind == "O":
        values = raw.to_numpy(dtype=object) if hasattr(raw, "to_numpy") else np.asarray(raw)
        return any(
            not _is_missing(v) and (isinstance(v, bool) or not isinstance(v, int | float))
            for v in values.ravel()
        )
    return True


#: ISO 8601 calendar dates, optionally with a time and an offset ("2026-12-03",
#: "2026-12-03T14:05:00.123+00:00", "2026-12-03 14:05Z").
_ISO_DATETIME = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?"
)


def _looks_datetime(raw: Any) -> bool:
    """True for datetime/timedelta dtypes, and for object columns whose non-missing values are
    all ``date``/``datetime``/``Timestamp`` objects or ISO 8601 date(time) strings (at least one
    such value)."""
    dtype = getattr(raw, "dtype", None)
    if dtype is not None and getattr(dtype, "kind", "") in "mM":
        return True
    if dtype is not None and getattr(dtype, "kind", "O") in "biuf":
        return False
    if hasattr(raw, "to_numpy"):
        values = raw.to_numpy(dtype=object)
    else:
        values = np.asarray(raw, dtype=object)
    values = values.ravel()
    if values.dtype.kind in "mM":
        return True
    seen = False
    for value in values:
        if _is_missing(value):
            continue
        if isinstance(value, _dt.date | np.datetime64):  # datetime and pandas' Timestamp too
            seen = True
        elif isinstance(value, str) and _ISO_DATETIME.fullmatch(value.strip()):
            seen = True
        else:
            return False
    return seen


def _prepare_datetime(name: str, raw: Any) -> DatetimeReference:
    values = raw.to_numpy(dtype=object) if hasattr(raw, "to_numpy") else np.asarray(raw, object)
    values = values.ravel()
    n_missing = sum(1 for v in values if _is_missing(v))
    return DatetimeReference(name=name, n_rows=values.size, n_missing=n_missing)


def _as_float(raw: Any, name: str) -> np.ndarray:
    try:
        if hasattr(raw, "to_numpy"):
            arr = raw.to_numpy(dtype=np.float64, na_value=np.nan)
        else:
            arr = np.asarray(raw)
            if arr.dtype != np.float64:
                arr = arr.astype(np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"column {name!r} is not numeric ({exc}); declare it categorical"
        ) from None
    if arr.ndim != 1:
        raise ValueError(f"column {name!r} must be one-dimensional, got shape {arr.shape}")
    return arr


def _split_sorted(arr: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Sort; return (sorted finite values, count of ±inf, count of NaN). NaN sorts last."""
    s = np.sort(arr)
    lo = int(np.searchsorted(s, -np.inf, "right"))
    hi = int(np.searchsorted(s, np.inf, "left"))
    end = int(np.searchsorted(s, np.inf, "right"))
    return s[lo:hi], lo + (end - hi), s.size - end


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.flags.writeable = False
    return arr


def _prepare_numeric(name: str, raw: Any) -> NumericReference:
    arr = _as_float(raw, name)
    values, n_inf, n_missing = _split_sorted(arr)
    n = values.size
    if n:
        std = float(np.std(values))  # ddof=0, as np.std and scipy's distances use
        center = float(np.mean(values))
        edges = psi_edges(values)
        # values are sorted: the distinct ones start where a value differs from its left one
        count_below = np.flatnonzero(np.concatenate(([True], values[1:] != values[:-1])))
        unique = values[count_below]
        count_upto = np.append(count_below[1:], n)
        # Grid for the large-sample KS: the distinct values at which the reference CDF crosses
        # k/GRID_SIZE, plus both ends.
        targets = np.arange(1, GRID_SIZE) * (n / GRID_SIZE)
        grid = np.unique(
            np.concatenate(
                ([0, unique.size - 1], np.searchsorted(count_upto, targets, "left"))
            ).clip(0, unique.size - 1)
        )
        cells = _cell_integrals(values, center)
    else:
        std, center = None, 0.0
        edges = np.empty(0)
        unique = np.empty(0)
        count_below = count_upto = grid = np.empty(0, dtype=np.intp)
        cells = None
    return NumericReference(
        name=name,
        n_rows=arr.size,
        n_missing=n_missing,
        n_inf=n_inf,
        values=_readonly(values),
        std=std,
        center=center,
        psi_edges=_readonly(edges),
        psi_counts=_readonly(_bin_counts(values, edges)),
        unique=_readonly(unique),
        count_below=_readonly(count_below),
        count_upto=_readonly(count_upto),
        grid=_readonly(grid),
        cell_integrals=None if cells is None else _readonly(cells),
    )


def _prepare_categorical(name: str, raw: Any) -> CategoricalReference:
    counts, n_rows, n_missing = category_counts(raw)
    return CategoricalReference(name=name, n_rows=n_rows, n_missing=n_missing, counts=counts)


# ---------------------------------------------------------------------------------------------
# Formulas


def psi_edges(values: np.ndarray, bins: int = PSI_BINS) -> np.ndarray:
    """Bin edges for PSI on a numeric feature: the reference quantiles k/bins, k = 1…bins-1.

    ``values``: finite reference values, shape (n,), n ≥ 1 → increasing edges, shape
    (≤ 2·(bins-1),).
    Bins are ``(-inf, e0), [e0, e1), …, [e_last, +inf)``: the outer ones are open, so current
    values outside the reference range still land in a bin. Repeated quantiles (a point mass,
    e.g. a zero-inflated or constant feature) are collapsed to one edge ``e`` and given a second
    edge at the next float above it, so that the mass sits in a bin ``[e, e⁺) = {e}`` of its own;
    without it a constant reference could not tell a current window that moved above it.
    """
    quantiles, repeats = np.unique(
        np.quantile(values, np.arange(1, bins) / bins), return_counts=True
    )
    return np.union1d(quantiles, np.nextafter(quantiles[repeats > 1], np.inf))


def population_stability_index(
    expected: np.ndarray, actual: np.ndarray, *, eps: float = PSI_EPS
) -> float:
    """PSI = Σ (a_i - e_i) · ln(a_i / e_i) over bins, in nats.

    ``expected`` (reference) and ``actual`` (current) are counts or proportions over the same
    bins, shape (k,); each is normalised to proportions, then floored at ``eps`` so that an empty
    bin contributes a finite term (Yurdakul 2018; Siddiqi 2006; proportions are not renormalised
    after flooring). Usual reading: < 0.1 stable, 0.1–0.25 moderate shift, ≥ 0.25 major shift.
    Raises ``ValueError`` if either side sums to zero or the shapes differ.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape:
        raise ValueError(f"bins differ: {e.shape} vs {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0:
        raise ValueError("PSI needs at least one value on each side")
    p = np.maximum(e / e.sum(), eps)
    q = np.maximum(a / a.sum(), eps)
    return float(np.sum((q - p) * np.log(q / p)))


def kolmogorov_smirnov(ref: NumericReference, current: np.ndarray, *, exact: bool) -> float:
    """Two-sample Kolmogorov–Smirnov statistic D = sup_x |F_ref(x) - F_cur(x)|, in [0, 1].

    ``current``: sorted finite values, shape (m,), m ≥ 1; the reference must be non-empty.
    D+ = sup(F_ref - F_cur) is reached at a reference value and D- = sup(F_cur - F_ref) just
    below one, so it suffices to evaluate both empirical CDFs at the distinct reference values
    (right and left limits). With ``exact`` all of them are used and the result equals
    ``scipy.stats.ks_2samp(ref, cur).statistic`` bit for bit (same counts, same divisions).
    Otherwise only the ≈``GRID_SIZE`` grid values (reference quantiles k/GRID_SIZE) are used: the
    result is a lower bound of D, short by at most the reference mass strictly between two
    consecutive grid values, i.e. about 1/GRID_SIZE ≈ 2.4e-4 (exact when the reference has at
    most ``GRID_SIZE`` distinct values).
    """
    n, m = ref.values.size, current.size
    idx = slice(None) if exact else ref.grid
    points = ref.unique[idx]
    cur_upto = np.searchsorted(current, points, "right") / m
    cur_below = np.searchsorted(current, points, "left") / m
    d_plus = np.max(ref.count_upto[idx] / n - cur_upto)
    d_minus = np.max(cur_below - ref.count_below[idx] / n)
    return float(max(d_plus, d_minus, 0.0))


def wasserstein_exact(ref: np.ndarray, current: np.ndarray) -> float:
    """Wasserstein-1 distance ∫ |F_ref(x) - F_cur(x)| dx, in the feature's unit.

    ``ref`` and ``current``: sorted finite values, shapes (n,), (m,), both non-empty. The same
    computation as ``scipy.stats.wasserstein_distance`` (merge, then sum of CDF gaps times the
    spacing), O((n + m) log(n + m)).
    """
    both = np.concatenate((ref, current))
    both.sort(kind="mergesort")  # two sorted runs: timsort merges them in linear time
    deltas = np.diff(both)
    f_ref = np.searchsorted(ref, both[:-1], "right") / ref.size
    f_cur = np.searchsorted(current, both[:-1], "right") / current.size
    return float(np.dot(np.abs(f_ref - f_cur), deltas))


def wasserstein(ref: NumericReference, current: np.ndarray, *, exact: bool) -> float:
    """Wasserstein-1 distance between the reference and ``current``, in the feature's unit.

    ``current``: sorted finite values, shape (m,), m ≥ 1; the reference must be non-empty. With
    ``exact`` this is :func:`wasserstein_exact` (equal to ``scipy.stats.wasserstein_distance``).
    Otherwise W1 = ∫₀¹ |Q_ref(u) - Q_cur(u)| du (quantile functions; Villani 2009, "Optimal
    Transport", Remark 2.19) is computed on ``GRID_SIZE`` equal cells of [0, 1] as
    Σ |∫_cell Q_ref - ∫_cell Q_cur|, the integrals over a cell coming exactly from partial sums of
    the sorted values. That is a lower bound of W1, exact except in the cells where the two
    quantile functions cross; on well-behaved data the relative error is below 1e-4.
    """
    if exact or ref.cell_integrals is None:
        return wasserstein_exact(ref.values, current)
    cur_cells = _cell_integrals(current, ref.center)
    return float(np.sum(np.abs(ref.cell_integrals - cur_cells)))


def wasserstein_normalised(ref: NumericReference, current: np.ndarray, *, exact: bool) -> float:
    """:func:`wasserstein` divided by the reference standard deviation (ddof=0); unitless.

    Equals ``scipy.stats.wasserstein_distance(ref, cur) / np.std(ref)`` when ``exact``; a shift of
    the mean by k standard deviations gives k. Raises ``ValueError`` when the reference standard
    deviation is 0 or undefined: a constant or empty reference has no scale to normalise by.
    """
    if not ref.std:
        raise ValueError("the reference standard deviation is 0 or undefined")
    return wasserstein(ref, current, exact=exact) / ref.std


def _cell_integrals(values: np.ndarray, center: float) -> np.ndarray:
    """∫ (Q(u) - center) du over the cells [j/G, (j+1)/G]; ``values`` sorted, shape (m,) → (G,).

    Q(u) = values[floor(u·m)], so ∫₀^(t/m) Q = (C[k] + (t - k)·values[k]) / m with k = floor(t)
    and C[k] the sum of the first k values. C is needed at only G + 1 indices: one
    ``np.add.reduceat`` pass gives the sums between them. Centering before the prefix sum keeps
    its rounding error negligible.
    """
    m = values.size
    t = np.arange(GRID_SIZE + 1) * (m / GRID_SIZE)
    k = np.minimum(t.astype(np.intp), m - 1)
    starts, inverse = np.unique(k, return_inverse=True)  # starts[0] == 0
    sums = np.add.reduceat(values, starts)[:-1] - center * np.diff(starts)
    prefix = np.concatenate(([0.0], np.cumsum(sums)))[inverse]
    partial = (prefix + (t - k) * (values[k] - center)) / m
    return np.diff(partial)


def jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> float:
    """Jensen–Shannon distance with base 2, in [0, 1]: sqrt of the JS divergence in bits.

    ``p`` and ``q``: counts or proportions over the same categories, shape (k,), each with a
    positive sum (normalised here). Same as ``scipy.spatial.distance.jensenshannon(p, q, base=2)``
    (Lin 1991, "Divergence measures based on the Shannon entropy"; Endres & Schindelin 2003 for
    the distance).
    """
    value = float(jensenshannon(np.asarray(p, float), np.asarray(q, float), base=2))
    # A tiny negative divergence from rounding would give NaN; identical inputs give 0.
    return 0.0 if math.isnan(value) else value


def chi_square(ref_counts: np.ndarray, cur_counts: np.ndarray) -> tuple[float, float]:
    """Pearson's chi-square test of homogeneity on the 2×k table [ref_counts; cur_counts].

    Shapes (k,), every column with a positive total and each row with a positive sum. Returns
    (statistic, p-value) from ``scipy.stats.chi2_contingency(table, correction=False)``: no Yates
    correction, so the statistic means the same for every k (Pearson 1900; Agresti 2013,
    "Categorical Data Analysis", §3.2). With k = 1 the statistic is 0 and the p-value 1. The
    p-value is the evidence half of a categorical verdict: with very large windows any
    difference is "significant", so the Jensen–Shannon distance and PSI must also reach their
    thresholds.
    """
    table = np.vstack((ref_counts, cur_counts)).astype(np.float64)
    if table.shape[1] < 2:
        return 0.0, 1.0
    result = chi2_contingency(table, correction=False)
    return float(result.statistic), float(result.pvalue)


def ks_pvalue(
    d: float, n: int, m: int, *, ref: np.ndarray | None = None, current: np.ndarray | None = None
) -> float:
    """p-value of the two-sample Kolmogorov–Smirnov test (two-sided) for statistic ``d``.

    ``n``, ``m``: the sample sizes; ``ref``/``current``: the samples (sorted finite values), used
    only when max(n, m) ≤ :data:`KS_EXACT_N`, where the result is
    ``scipy.stats.ks_2samp(ref, current).pvalue`` (exact distribution of D under H0, computed
    by scipy). Larger samples use Smirnov's asymptotic distribution with en = n·m/(n+m):
    ``scipy.stats.kstwo.sf(d, round(en))`` (as ``ks_2samp(method="asymp")``) up to en =
    :data:`KS_KSTWO_LIMIT`, and beyond it the limiting Kolmogorov distribution
    ``scipy.stats.kstwobign.sf(d·sqrt(en))`` (Kolmogorov 1933, Smirnov 1948), because
    ``kstwo.sf`` costs 0.1–1 s per call at large n. The test assumes continuous data: with ties
    it is conservative (the p-value is too large, never too small). In [0, 1].
    """
    if n < 1 or m < 1:
        return 1.0
    if max(n, m) <= KS_EXACT_N and ref is not None and current is not None:
        return float(min(1.0, max(0.0, ks_2samp(ref, current).pvalue)))
    big, small = max(n, m), min(n, m)
    en = big * small / (big + small)
    if en <= KS_KSTWO_LIMIT:
        p = kstwo.sf(d, round(en))
    else:
        p = kstwobign.sf(d * math.sqrt(en))
    return float(min(1.0, max(0.0, p)))


def benjamini_hochberg(pvalues: list[float | None]) -> list[float | None]:
    """Benjamini–Hochberg adjusted p-values (q-values) of a family of tests, in the input order;
    ``None`` entries are not tests and stay ``None``.

    q_(i) = min over j ≥ i of p_(j) · k / j (p sorted ascending, k tests), capped at 1
    (Benjamini & Hochberg 1995; the same as ``scipy.stats.false_discovery_control(ps,
    method="bh")``). Rejecting q < α keeps the expected share of false drift verdicts among
    the flagged columns at most α, for independent or positively dependent tests.
    """
    tested = [(p, i) for i, p in enumerate(pvalues) if p is not None]
    out: list[float | None] = [None] * len(pvalues)
    if not tested:
        return out
    k = len(tested)
    tested.sort()
    running = 1.0
    for rank in range(k, 0, -1):
        p, index = tested[rank - 1]
        running = min(running, p * k / rank)
        out[index] = min(1.0, running)
    return out


def _bin_counts(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts of sorted ``values`` in (-inf, e0), [e0, e1), …, [e_last, +inf): shape (len+1,)."""
    cuts = np.searchsorted(values, edges, "left")
    return np.diff(np.concatenate(([0], cuts, [values.size])))


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float | np.floating):
        return math.isnan(value)
    return type(value).__name__ in {"NAType", "NaTType"}


def _label(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def category_counts(raw: Any) -> tuple[dict[str, int], int, int]:
    """Count categories of a 1-D array-like: ({str(value): count}, n_rows, n_missing).

    None, NaN, pandas NA and NaT are missing. Categories are compared by their ``str``, with
    integral floats written as integers, so 1, 1.0 and "1" are one category: class labels read
    back as floats (an integer column with a gap) still match the reference's integers.
    """
    if hasattr(raw, "to_numpy"):
        arr = raw.to_numpy()
    elif isinstance(raw, list | tuple):
        arr = np.asarray(raw, dtype=object)
    else:
        arr = np.asarray(raw)
    arr = arr.ravel()
    n_rows = arr.size
    if arr.dtype.kind in "biuf":
        if arr.dtype.kind == "f":
            arr = arr[~np.isnan(arr)]
        keys, counts = np.unique(arr, return_counts=True)
        pairs = zip(keys.tolist(), counts.tolist(), strict=True)
        result = {_label(k): int(c) for k, c in pairs}
        return result, n_rows, n_rows - int(arr.size)
    result: dict[str, int] = {}
    n_missing = 0
    for key, count in Counter(arr.tolist()).items():
        if _is_missing(key):
            n_missing += count
        else:
            label = _label(key)
            result[label] = result.get(label, 0) + count
    return result, n_rows, n_missing


# ---------------------------------------------------------------------------------------------
# Results


@dataclass
class FeatureDrift:
    """Drift figures of one column. Every figure is ``None`` where it is undefined or not
    applicable (e.g. ``jensen_shannon`` on a numeric feature); shares are in [0, 1] of all rows.
    ``test`` names the test of "no drift" (``ks`` or ``chi2``), ``pvalue`` its p-value,
    ``qvalue`` the p-value adjusted across the window's columns (Benjamini–Hochberg) and
    ``alpha`` the level it was compared with.
    """

    name: str
    kind: str
    status: Status
    reason: str
    n_reference: int = 0
    n_current: int = 0
    n_reference_used: int = 0
    n_current_used: int = 0
    missing_share_reference: float | None = None
    missing_share_current: float | None = None
    inf_share_reference: float | None = None
    inf_share_current: float | None = None
    psi: float | None = None
    ks: float | None = None
    wasserstein: float | None = None
    wasserstein_normalised: float | None = None
    chi2: float | None = None
    chi2_pvalue: float | None = None
    jensen_shannon: float | None = None
    new_categories: list[str] = field(default_factory=list)
    new_category_count: int | None = None
    new_category_share: float | None = None
    exact: bool | None = None
    test: str | None = None
    pvalue: float | None = None
    qvalue: float | None = None
    alpha: float | None = None

    @property
    def drifted(self) -> bool:
        return self.status == Status.DRIFT

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["status"] = str(self.status)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


@dataclass
class DatasetDrift:
    """Drift of a whole window: per-feature results, the share of drifted features among those
    with enough data, and whether that share reaches ``drift_share`` (``drifted``)."""

    features: list[FeatureDrift]
    prediction: FeatureDrift | None
    n_reference: int
    n_current: int
    n_evaluated: int
    n_drifted: int
    share_drifted: float | None
    drift_share: float
    drifted: bool
    reason: str

    def feature(self, name: str) -> FeatureDrift:
        for item in self.features:
            if item.name == name:
                return item
        if self.prediction is not None and self.prediction.name == name:
            return self.prediction
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "drifted": self.drifted,
            "share_drifted": self.share_drifted,
            "drift_share": self.drift_share,
            "n_reference": self.n_reference,
            "n_current": self.n_current,
            "n_features": len(self.features),
            "n_evaluated": self.n_evaluated,
            "n_drifted": self.n_drifted,
            "reason": self.reason,
            "features": [f.as_dict() for f in self.features],
            "prediction": None if self.prediction is None else self.prediction.as_dict(),
        }


# ---------------------------------------------------------------------------------------------
# Comparison


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _insufficient(ref_used: int, cur_used: int, n_cur: int, min_rows: int, what: str) -> str:
    if n_cur == 0:
        return "the current window has no rows"
    reasons = []
    for side, used in (("reference", ref_used), ("current window", cur_used)):
        if used == 0:
            reasons.append(f"the {side} has no usable {what} (all missing)")
        elif used < min_rows:
            reasons.append(f"the {side} has {used} usable {what}, fewer than min_rows={min_rows}")
    return "; ".join(reasons)


def _missing_note(result: FeatureDrift, limits: Thresholds) -> str | None:
    a, b = result.missing_share_reference, result.missing_share_current
    if a is None or b is None or abs(b - a) < limits.missing_change or abs(b - a) == 0:
        return None
    return f"missing share changed from {_fmt(a)} to {_fmt(b)} (≥ {_fmt(limits.missing_change)})"


def numeric_feature_drift(
    ref: NumericReference,
    raw: Any,
    *,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    min_rows: int = MIN_ROWS,
    exact_limit: int = EXACT_LIMIT,
    alpha: float = ALPHA,
) -> FeatureDrift:
    """Compare one numeric current column (1-D array-like, NaN/None missing) with ``ref``, as
    a family of one test (no multiple-testing adjustment: ``qvalue == pvalue``)."""
    result = _numeric_figures(ref, raw, min_rows=min_rows, exact_limit=exact_limit)
    result.qvalue = result.pvalue
    return _judge(result, thresholds, alpha)


def _numeric_figures(
    ref: NumericReference, raw: Any, *, min_rows: int, exact_limit: int
) -> FeatureDrift:
    arr = _as_float(raw, ref.name)
    values, n_inf, n_missing = _split_sorted(arr)
    n, m = ref.values.size, values.size
    result = FeatureDrift(
        name=ref.name,
        kind="numeric",
        status=Status.INSUFFICIENT,
        reason="",
        n_reference=ref.n_rows,
        n_current=arr.size,
        n_reference_used=n,
        n_current_used=m,
        missing_share_reference=_share(ref.n_missing, ref.n_rows),
        missing_share_current=_share(n_missing, arr.size),
        inf_share_reference=_share(ref.n_inf, ref.n_rows),
        inf_share_current=_share(n_inf, arr.size),
    )
    min_rows = max(min_rows, 1)
    if n < min_rows or m < min_rows:
        result.reason = _insufficient(n, m, arr.size, min_rows, "values")
        return result
    exact = n + m <= exact_limit
    result.exact = exact
    result.psi = population_stability_index(ref.psi_counts, _bin_counts(values, ref.psi_edges))
    result.ks = kolmogorov_smirnov(ref, values, exact=exact)
    result.test = "ks"
    # On the grid, D is a lower bound (by at most ~1/GRID_SIZE): the p-value errs large.
    result.pvalue = ks_pvalue(result.ks, n, m, ref=ref.values, current=values)
    result.wasserstein = wasserstein(ref, values, exact=exact)
    if ref.std:
        result.wasserstein_normalised = result.wasserstein / ref.std
    result.status = Status.OK  # judged by _judge
    return result


def categorical_feature_drift(
    ref: CategoricalReference,
    raw: Any,
    *,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    min_rows: int = MIN_ROWS,
    alpha: float = ALPHA,
) -> FeatureDrift:
    """Compare one categorical current column (1-D array-like, None/NaN missing) with ``ref``,
    as a family of one test (``qvalue == pvalue``)."""
    result = _categorical_figures(ref, raw, min_rows=min_rows)
    result.qvalue = result.pvalue
    return _judge(result, thresholds, alpha)


def _categorical_figures(ref: CategoricalReference, raw: Any, *, min_rows: int) -> FeatureDrift:
    counts, n_rows, n_missing = category_counts(raw)
    n = sum(ref.counts.values())
    m = sum(counts.values())
    result = FeatureDrift(
        name=ref.name,
        kind="categorical",
        status=Status.INSUFFICIENT,
        reason="",
        n_reference=ref.n_rows,
        n_current=n_rows,
        n_reference_used=n,
        n_current_used=m,
        missing_share_reference=_share(ref.n_missing, ref.n_rows),
        missing_share_current=_share(n_missing, n_rows),
    )
    min_rows = max(min_rows, 1)
    if n < min_rows or m < min_rows:
        result.reason = _insufficient(n, m, n_rows, min_rows, "values")
        return result
    categories = sorted(set(ref.counts) | set(counts))
    p = np.array([ref.counts.get(c, 0) for c in categories], dtype=np.float64)
    q = np.array([counts.get(c, 0) for c in categories], dtype=np.float64)
    new = [c for c in categories if c not in ref.counts]
    result.exact = True
    result.new_categories = new[:MAX_LISTED_CATEGORIES]
    result.new_category_count = len(new)
    result.new_category_share = sum(counts[c] for c in new) / n_rows
    result.psi = population_stability_index(p, q)
    result.chi2, result.chi2_pvalue = chi_square(p, q)
    result.test, result.pvalue = "chi2", result.chi2_pvalue
    result.jensen_shannon = jensen_shannon_distance(p, q)
    result.status = Status.OK  # judged by _judge
    return result


def _datetime_skipped(ref: DatetimeReference, raw: Any | None) -> FeatureDrift:
    n_current = 0 if raw is None else int(np.asarray(raw, dtype=object).size)
    return FeatureDrift(
        name=ref.name,
        kind="datetime",
        status=Status.SKIPPED,
        reason=(
            "skipped: a date/time column (every new window holds new timestamps, so it would "
            "always look drifted); monitor the features derived from it instead"
        ),
        n_reference=ref.n_rows,
        n_current=n_current,
        missing_share_reference=_share(ref.n_missing, ref.n_rows),
    )


_TEST_NAMES = {"ks": "KS", "chi2": "chi-square"}


def _judge(result: FeatureDrift, limits: Thresholds, alpha: float) -> FeatureDrift:
    """Set ``status`` and ``reason`` from the figures and ``qvalue``.

    drift: an effect reaches its drift threshold (PSI ≥ ``psi_drift``, Wasserstein/σ ≥
    ``wasserstein``, Jensen–Shannon ≥ ``jensen_shannon``) and q < ``alpha``; warning: PSI in the
    warning band and q < ``alpha``, or a change that needs no test (missing share changed by ≥
    ``missing_change``, categories unseen in the reference); ok otherwise, saying when an effect
    was not significant.
    """
    if result.status not in EVALUATED:
        return result
    result.alpha = alpha
    significant = result.qvalue is not None and result.qvalue < alpha
    drift, warn, fine, notes, extra = [], [], [], [], []
    if result.kind == "categorical" and result.jensen_shannon is not None:
        js_text = f"Jensen–Shannon {_fmt(result.jensen_shannon)}"
        if result.jensen_shannon >= limits.jensen_shannon:
            drift.append(f"{js_text} ≥ {_fmt(limits.jensen_shannon)}")
        else:
            fine.append(f"{js_text} < {_fmt(limits.jensen_shannon)}")
    if result.psi is not None:
        psi_text = f"PSI {_fmt(result.psi)}"
        if result.psi >= limits.psi_drift:
            drift.append(f"{psi_text} ≥ {_fmt(limits.psi_drift)}")
        elif result.psi >= limits.psi_warning:
            warn.append(f"{psi_text} ≥ {_fmt(limits.psi_warning)}")
        else:
            fine.append(f"{psi_text} < {_fmt(limits.psi_warning)}")
    if result.kind == "numeric":
        if result.wasserstein_normalised is not None:
            w_text = f"Wasserstein/σ {_fmt(result.wasserstein_normalised)}"
            if result.wasserstein_normalised >= limits.wasserstein:
                drift.append(f"{w_text} ≥ {_fmt(limits.wasserstein)}")
            else:
                fine.append(f"{w_text} < {_fmt(limits.wasserstein)}")
        else:
            notes.append(
                "normalised Wasserstein undefined: the reference is constant (standard deviation 0)"
            )
    new = result.new_category_count or 0
    if new:
        shown = ", ".join(repr(c) for c in result.new_categories[:5]) + (", …" if new > 5 else "")
        extra.append(
            f"{new} categories unseen in the reference ({shown}) hold "
            f"{_fmt(result.new_category_share or 0.0)} of current rows"
        )
    if note := _missing_note(result, limits):
        extra.append(note)
    if result.inf_share_current:
        notes.append(
            f"{_fmt(result.inf_share_current)} of current values are ±inf and were left out"
        )
    test = _TEST_NAMES.get(result.test or "", result.test or "test")
    p_text = f"{test} p {_fmt(result.pvalue)}" if result.pvalue is not None else f"{test} p n/a"
    if result.qvalue is not None and result.qvalue != result.pvalue:
        p_text += f", adjusted {_fmt(result.qvalue)}"
    evidence = f"{p_text} {'<' if significant else '≥'} α {_fmt(alpha)}"
    if drift and significant:
        result.status, parts = Status.DRIFT, [*drift, *warn, evidence, *extra]
    elif warn and significant:
        result.status, parts = Status.WARNING, [*warn, evidence, *extra]
    elif extra:
        result.status, parts = Status.WARNING, extra + ([evidence] if drift or warn else [])
    else:
        result.status = Status.OK
        if drift or warn:
            parts = [f"{'; '.join(drift + warn)}, but not significant ({evidence})"]
        else:
            parts = [*fine, evidence]
    result.reason = "; ".join(parts + notes)
    return result


def compute_drift(
    reference: Reference,
    current: Any,
    *,
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
    feature_thresholds: Mapping[str, Thresholds] | None = None,
    min_rows: int = MIN_ROWS,
    drift_share: float = DRIFT_SHARE,
    exact_limit: int = EXACT_LIMIT,
    alpha: float = ALPHA,
    workers: int | None = None,
) -> DatasetDrift:
    """Compare a current window with a prepared reference.

    ``current``: a DataFrame or mapping of column name to 1-D array-like, holding (at least) the
    reference's columns; extra columns are ignored and a missing one is "insufficient data".
    ``feature_thresholds`` overrides ``thresholds`` per column. A feature with fewer than
    ``min_rows`` usable values on either side is "insufficient data", a date/time column is
    "skipped"; both are left out of the share. The p-values of the judged columns (the
    prediction column included) are adjusted together by Benjamini–Hochberg and compared with
    ``alpha`` (see :func:`_judge` for the verdict). The dataset drifted when ``share_drifted =
    drifted / evaluated ≥ drift_share`` (the prediction column is reported apart and not
    counted). KS and Wasserstein are exact when the reference and current usable values
    together are at most ``exact_limit``, else approximated on a grid (see
    :func:`kolmogorov_smirnov`). ``workers`` defaults to the number of CPUs.

    Raises ``ValueError`` when ``drift_share`` is not in (0, 1], ``alpha`` not in (0, 1), or a
    column cannot be read as its reference's kind (e.g. text in a numeric column).
    """
    if not 0 < drift_share <= 1:
        raise ValueError("drift_share must be in (0, 1]")
    if not 0 < alpha < 1:
        raise ValueError("alpha must be in (0, 1)")
    overrides = dict(feature_thresholds or {})
    unknown = set(overrides) - set(reference.columns)
    if unknown:
        raise ValueError(f"thresholds given for unknown columns: {sorted(unknown)}")
    names = list(reference.columns)
    present = set(_column_names(current))

    def one(name: str) -> FeatureDrift:
        ref = reference.columns[name]
        if isinstance(ref, DatetimeReference):
            return _datetime_skipped(ref, current[name] if name in present else None)
        if name not in present:
            return FeatureDrift(
                name=name,
                kind=ref.kind,
                status=Status.INSUFFICIENT,
                reason="the column is not in the current window",
                n_reference=ref.n_rows,
            )
        if isinstance(ref, NumericReference):
            return _numeric_figures(ref, current[name], min_rows=min_rows, exact_limit=exact_limit)
        return _categorical_figures(ref, current[name], min_rows=min_rows)

    results = _map(one, names, workers)
    judged = [r for r in results if r.status in EVALUATED]
    for item, q in zip(judged, benjamini_hochberg([r.pvalue for r in judged]), strict=True):
        item.qvalue = q
        _judge(item, overrides.get(item.name, thresholds), alpha)

    prediction = None
    features = []
    for item in results:
        if item.name == reference.prediction:
            prediction = item
        else:
            features.append(item)
    evaluated = [f for f in features if f.status in EVALUATED]
    n_drifted = sum(f.drifted for f in evaluated)
    share = n_drifted / len(evaluated) if evaluated else None
    drifted = share is not None and share >= drift_share
    skipped = sum(f.status == Status.SKIPPED for f in features)
    insufficient = sum(f.status == Status.INSUFFICIENT for f in features)
    if share is None:
        reason = "no feature has enough data to judge drift"
    else:
        verb = "≥" if drifted else "<"
        reason = (
            f"{n_drifted} of {len(evaluated)} evaluated features drifted "
            f"(share {_fmt(share)} {verb} {_fmt(drift_share)}; tests at α {_fmt(alpha)} after "
            f"Benjamini–Hochberg)"
        )
    if insufficient and share is not None:
        reason += f"; {insufficient} with insufficient data"
    if skipped:
        reason += f"; {skipped} date/time skipped"
    n_current = max((f.n_current for f in results), default=0)
    return DatasetDrift(
        features=features,
        prediction=prediction,
        n_reference=reference.n_rows,
        n_current=n_current,
        n_evaluated=len(evaluated),
        n_drifted=n_drifted,
        share_drifted=share,
        drift_share=drift_share,
        drifted=drifted,
        reason=reason,
    )

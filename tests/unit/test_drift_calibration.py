"""Calibration of the drift verdicts (issue 9, point 10): same-distribution samples must not
be flagged more than 5 % of the time at any size, a real shift must be found, and the p-values
behind the verdicts agree with scipy. Seeded, so the counts are deterministic."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest
from scipy.stats import false_discovery_control, ks_2samp, kstwo, kstwobign

from monitoring.drift import (
    ALPHA,
    KS_EXACT_N,
    KS_KSTWO_LIMIT,
    Status,
    benjamini_hochberg,
    compute_drift,
    ks_pvalue,
    prepare_reference,
)

TRIALS = 200
MAX_FALSE_SHARE = 0.05
CATEGORIES = np.array(["a", "b", "c", "d"])
CATEGORY_P = [0.4, 0.3, 0.2, 0.1]


def numeric_false_alarms(n: int, m: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    flagged = 0
    for _ in range(TRIALS):
        reference = prepare_reference({"x": rng.normal(size=n)}, workers=1)
        report = compute_drift(reference, {"x": rng.normal(size=m)}, workers=1)
        flagged += report.features[0].status == Status.DRIFT
    return flagged


def categorical_false_alarms(n: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    flagged = 0
    for _ in range(TRIALS):
        ref = rng.choice(CATEGORIES, p=CATEGORY_P, size=n)
        cur = rng.choice(CATEGORIES, p=CATEGORY_P, size=n)
        reference = prepare_reference({"c": ref}, workers=1)
        report = compute_drift(reference, {"c": cur}, workers=1)
        assert report.features[0].kind == "categorical"
        flagged += report.features[0].status == Status.DRIFT
    return flagged


SMALL_SIZES = [50, 100, 300, 1000]
LARGE_SIZES = [
    pytest.param(10_000, marks=pytest.mark.slow),
    pytest.param(100_000, marks=pytest.mark.slow),
]


def test_the_issue_example_300_reference_200_current_rows():
    # 122 of 200 trials were flagged before the verdict asked for significance
    assert numeric_false_alarms(300, 200, seed=1) <= MAX_FALSE_SHARE * TRIALS


@pytest.mark.parametrize("n", SMALL_SIZES + LARGE_SIZES)
def test_same_numeric_distribution_is_rarely_flagged(n):
    flagged = numeric_false_alarms(n, n, seed=n)
    assert flagged <= MAX_FALSE_SHARE * TRIALS, f"{flagged} of {TRIALS} flagged at n={n}"


@pytest.mark.parametrize("n", SMALL_SIZES + LARGE_SIZES)
def test_same_categorical_distribution_is_rarely_flagged(n):
    flagged = categorical_false_alarms(n, seed=n + 1)
    assert flagged <= MAX_FALSE_SHARE * TRIALS, f"{flagged} of {TRIALS} flagged at n={n}"


def test_many_same_distribution_features_do_not_flag_the_dataset():
    # 10 features: without a correction some feature would pass α by chance in most windows
    rng = np.random.default_rng(7)
    drifted_windows = 0
    for _ in range(TRIALS):
        ref = {f"f{i}": rng.normal(size=300) for i in range(10)}
        cur = {f"f{i}": rng.normal(size=300) for i in range(10)}
        report = compute_drift(prepare_reference(ref, workers=1), cur, workers=1)
        drifted_windows += report.n_drifted > 0
    assert drifted_windows <= MAX_FALSE_SHARE * TRIALS


def test_half_a_standard_deviation_shift_is_found_at_300_rows():
    rng = np.random.default_rng(3)
    flagged = 0
    for _ in range(TRIALS):
        reference = prepare_reference({"x": rng.normal(size=300)}, workers=1)
        report = compute_drift(reference, {"x": rng.normal(0.5, 1, size=300)}, workers=1)
        flagged += report.features[0].status == Status.DRIFT
    assert flagged >= 0.9 * TRIALS, f"only {flagged} of {TRIALS} flagged"


def test_a_large_effect_that_is_not_significant_is_ok_and_says_why():
    rng = np.random.default_rng(4)
    reference = prepare_reference({"x": rng.normal(size=40)})
    report = compute_drift(reference, {"x": rng.normal(size=40)})
    f = report.features[0]
    assert f.test == "ks" and f.pvalue is not None and f.qvalue == f.pvalue
    assert f.alpha == ALPHA
    if f.psi >= 0.25:  # 9 bins over 40 rows: PSI is large by chance alone
        assert f.status == Status.OK and "not significant" in f.reason


def test_ks_pvalue_agrees_with_scipy_in_each_regime():
    rng = np.random.default_rng(5)
    a, b = np.sort(rng.normal(size=300)), np.sort(rng.normal(0.1, 1, size=200))
    expected = ks_2samp(a, b)
    assert ks_pvalue(expected.statistic, 300, 200, ref=a, current=b) == expected.pvalue
    # above KS_EXACT_N: scipy's asymptotic formula, while en stays small enough for kstwo
    n, m = KS_EXACT_N + 1, 50
    a, b = np.sort(rng.normal(size=n)), np.sort(rng.normal(size=m))
    expected = ks_2samp(a, b)  # scipy's own "auto" is asymptotic here too
    assert ks_pvalue(expected.statistic, n, m, ref=a, current=b) == pytest.approx(
        expected.pvalue, rel=1e-12
    )
    # very large en: the limiting distribution, close to kstwo
    n = m = 4 * KS_KSTWO_LIMIT
    en = n * m / (n + m)
    d = 1.2 / np.sqrt(en)
    assert ks_pvalue(d, n, m) == pytest.approx(kstwobign.sf(1.2))
    assert ks_pvalue(d, n, m) == pytest.approx(kstwo.sf(d, round(en)), rel=1e-2)


def test_benjamini_hochberg_equals_scipy():
    rng = np.random.default_rng(6)
    ps = rng.uniform(size=25) ** 3
    assert benjamini_hochberg(list(ps)) == pytest.approx(false_discovery_control(ps, method="bh"))
    assert benjamini_hochberg([None, 0.02, None]) == [None, 0.02, None]


def test_the_window_adjusts_p_values_across_columns():
    rng = np.random.default_rng(8)
    ref = {"moved": rng.normal(size=2000), "same": rng.normal(size=2000)}
    cur = {"moved": rng.normal(0.3, 1, size=2000), "same": rng.normal(size=2000)}
    report = compute_drift(prepare_reference(ref), cur)
    ps = [report.feature(n).pvalue for n in ("moved", "same")]
    qs = [report.feature(n).qvalue for n in ("moved", "same")]
    assert qs == pytest.approx(list(false_discovery_control(ps, method="bh")))
    assert report.feature("moved").status == Status.DRIFT
    assert "α" in report.feature("moved").reason


@pytest.mark.parametrize(
    "column",
    [
        pytest.param(
            [dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(hours=i) for i in range(100)],
            id="datetime objects",
        ),
        pytest.param(
            [f"2026-01-{1 + i % 28:02d}T{i % 24:02d}:00:00Z" for i in range(100)], id="iso"
        ),
        pytest.param([f"2026-02-{1 + i % 28:02d}" for i in range(100)], id="dates"),
        pytest.param(np.arange(100).astype("datetime64[h]"), id="datetime64"),
    ],
)
def test_datetime_columns_are_skipped_with_a_reason(column):
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(9)
    ref = pd.DataFrame({"when": column, "x": rng.normal(size=100)})
    later = pd.DataFrame({"when": column, "x": rng.normal(size=100)})
    report = compute_drift(prepare_reference(ref), later)
    when = report.feature("when")
    assert when.kind == "datetime" and when.status == Status.SKIPPED
    assert "date/time" in when.reason and not when.drifted
    assert report.n_evaluated == 1 and "1 date/time skipped" in report.reason
    assert report.as_dict()["features"][0]["status"] == "skipped"


def test_text_that_only_starts_like_a_date_is_still_categorical():
    values = ["2026-01-01 sale", "2026-01-02"] * 30
    report = compute_drift(prepare_reference({"c": values}), {"c": values})
    assert report.features[0].kind == "categorical"

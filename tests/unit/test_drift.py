"""Drift engine: figures against scipy / plain-numpy references, edge cases, statuses, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.spatial.distance import jensenshannon
from scipy.stats import chi2_contingency, ks_2samp, wasserstein_distance

from monitoring.drift import (
    GRID_SIZE,
    PSI_EPS,
    Status,
    Thresholds,
    compute_drift,
    population_stability_index,
    prepare_reference,
)

TOL = 1e-9


def reference_psi(ref: np.ndarray, cur: np.ndarray, bins: int = 10) -> float:
    """Plain numpy PSI: edges at the reference deciles, outer bins open, proportions floored."""
    quantiles = np.quantile(ref, np.arange(1, bins) / bins)
    edges = np.unique(quantiles)
    repeated = [e for e in edges if np.sum(quantiles == e) > 1]  # point mass: a bin {e} of its own
    edges = np.unique(np.concatenate([edges, np.nextafter(repeated, np.inf)]))
    p = np.bincount(np.digitize(ref, edges), minlength=edges.size + 1) / ref.size
    q = np.bincount(np.digitize(cur, edges), minlength=edges.size + 1) / cur.size
    p, q = np.maximum(p, PSI_EPS), np.maximum(q, PSI_EPS)
    return float(np.sum((q - p) * np.log(q / p)))


def strict_json(report) -> dict:
    """as_dict() must survive json.dumps without NaN or infinity anywhere."""
    return json.loads(json.dumps(report.as_dict(), allow_nan=False))


def one(ref_values, cur_values, **kwargs):
    categorical = {"x"} if kwargs.pop("categorical", False) else set()
    reference = prepare_reference({"x": ref_values}, categorical=categorical)
    report = compute_drift(reference, {"x": cur_values}, **kwargs)
    strict_json(report)
    return report.features[0]


# --- numeric figures against references -------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "m", "shift", "scale", "seed"),
    [(200, 150, 0.0, 1.0, 1), (500, 800, 0.4, 1.0, 2), (80, 60, 0.0, 2.0, 3), (1000, 999, 3, 1, 4)],
)
def test_numeric_figures_equal_references_on_small_samples(n, m, shift, scale, seed):
    rng = np.random.default_rng(seed)
    ref = rng.normal(size=n)
    cur = rng.normal(shift, scale, size=m)
    f = one(ref, cur)
    assert f.exact is True
    assert f.psi == pytest.approx(reference_psi(ref, cur), abs=TOL)
    assert f.ks == pytest.approx(ks_2samp(ref, cur).statistic, abs=TOL)
    expected_w = wasserstein_distance(ref, cur)
    assert f.wasserstein == pytest.approx(expected_w, abs=TOL)
    # Normalised by the population standard deviation (ddof=0), as np.std computes it.
    assert f.wasserstein_normalised == pytest.approx(expected_w / np.std(ref), abs=TOL)


def test_ties_and_integer_valued_features_match_scipy():
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 6, size=300).astype(float)
    cur = rng.integers(1, 8, size=250).astype(float)
    f = one(ref, cur)
    assert f.ks == pytest.approx(ks_2samp(ref, cur).statistic, abs=TOL)
    assert f.wasserstein_normalised == pytest.approx(
        wasserstein_distance(ref, cur) / np.std(ref), abs=TOL
    )
    assert f.psi == pytest.approx(reference_psi(ref, cur), abs=TOL)


def test_psi_function_floors_empty_bins():
    assert population_stability_index([50, 50, 0], [50, 50, 0]) == 0.0
    value = population_stability_index([1, 1, 0], [1, 1, 1])
    p = np.array([0.5, 0.5, PSI_EPS])
    q = np.array([1 / 3, 1 / 3, 1 / 3])
    assert value == pytest.approx(float(np.sum((q - p) * np.log(q / p))), abs=TOL)
    with pytest.raises(ValueError):
        population_stability_index([0, 0], [1, 2])


def test_large_sample_grid_approximations_are_close_to_exact():
    rng = np.random.default_rng(6)
    ref = rng.normal(size=200_000)
    cur = np.concatenate([rng.normal(0.1, 1.2, size=150_000), rng.normal(2, 0.5, size=50_000)])
    reference = prepare_reference({"x": ref})
    approx = compute_drift(reference, {"x": cur}, exact_limit=0).features[0]
    exact = compute_drift(reference, {"x": cur}, exact_limit=10**9).features[0]
    assert approx.exact is False and exact.exact is True
    assert exact.ks == pytest.approx(ks_2samp(ref, cur).statistic, abs=TOL)
    assert exact.wasserstein_normalised == pytest.approx(
        wasserstein_distance(ref, cur) / np.std(ref), abs=TOL
    )
    # Documented bounds: KS short by at most ~1/GRID_SIZE, Wasserstein a tight lower bound.
    assert 0 <= exact.ks - approx.ks <= 1 / GRID_SIZE + 1e-12
    assert abs(approx.ks - exact.ks) <= 1e-3
    assert abs(approx.wasserstein_normalised - exact.wasserstein_normalised) <= 1e-3
    assert approx.wasserstein_normalised <= exact.wasserstein_normalised + 1e-12
    assert approx.psi == pytest.approx(exact.psi, abs=TOL)  # PSI is always exact


def test_large_sample_ks_is_exact_when_reference_has_few_distinct_values():
    rng = np.random.default_rng(7)
    ref = rng.integers(0, 50, size=150_000).astype(float)
    cur = rng.integers(3, 60, size=150_000).astype(float)
    f = one(ref, cur, exact_limit=0)
    assert f.exact is False
    assert f.ks == pytest.approx(ks_2samp(ref, cur).statistic, abs=TOL)


# --- categorical figures ----------------------------------------------------------------------


def test_categorical_figures_match_scipy_and_flag_new_categories():
    rng = np.random.default_rng(8)
    ref = rng.choice(["a", "b", "c", "d"], p=[0.4, 0.3, 0.2, 0.1], size=1000)
    cur = rng.choice(["a", "b", "c", "e", "f"], p=[0.2, 0.3, 0.3, 0.15, 0.05], size=700)
    f = one(ref, cur, categorical=True)
    categories = ["a", "b", "c", "d", "e", "f"]
    p = np.array([np.sum(ref == c) for c in categories])
    q = np.array([np.sum(cur == c) for c in categories])
    assert f.jensen_shannon == pytest.approx(jensenshannon(p, q, base=2), abs=TOL)
    expected = chi2_contingency(np.vstack([p, q]), correction=False)
    assert f.chi2 == pytest.approx(expected.statistic, abs=TOL)
    assert f.chi2_pvalue == pytest.approx(expected.pvalue, abs=TOL)
    assert f.psi == pytest.approx(population_stability_index(p, q), abs=TOL)
    assert f.new_categories == ["e", "f"]
    assert f.new_category_count == 2
    assert f.new_category_share == pytest.approx((q[4] + q[5]) / 700)
    assert f.status == Status.DRIFT
    assert "unseen in the reference" in f.reason


def test_categorical_columns_are_detected_and_missing_values_counted():
    ref = ["x", "y", None, "x", float("nan")] * 20
    cur = ["x", "y", "y", None] * 20
    reference = prepare_reference({"c": ref})
    f = compute_drift(reference, {"c": cur}).features[0]
    assert f.kind == "categorical"
    assert f.missing_share_reference == pytest.approx(0.4)
    assert f.missing_share_current == pytest.approx(0.25)
    assert f.n_reference_used == 60 and f.n_current_used == 60


def test_integer_labels_read_back_as_floats_are_the_same_categories():
    ref = [0, 1, 2] * 20
    cur = np.array([0.0, 1.0, 2.0, np.nan] * 15)
    f = one(ref, cur, categorical=True)
    assert f.new_categories == [] and f.jensen_shannon == 0.0
    assert f.missing_share_current == pytest.approx(0.25)


def test_same_categorical_distribution_is_ok():
    rng = np.random.default_rng(9)
    ref = rng.integers(0, 4, size=5000)
    cur = rng.integers(0, 4, size=5000)
    f = one(ref, cur, categorical=True)
    assert f.status == Status.OK, f.reason
    assert f.jensen_shannon < 0.05 and f.new_categories == []


def test_single_category_on_both_sides():
    f = one(["a"] * 40, ["a"] * 50, categorical=True)
    assert f.status == Status.OK
    assert (f.chi2, f.chi2_pvalue, f.jensen_shannon, f.psi) == (0.0, 1.0, 0.0, 0.0)


# --- prediction drift -------------------------------------------------------------------------


def test_prediction_column_is_reported_apart_and_not_counted():
    rng = np.random.default_rng(10)
    ref = {"a": rng.normal(size=5000), "label": rng.choice([0, 1], size=5000, p=[0.8, 0.2])}
    cur = {"a": rng.normal(size=5000), "label": rng.choice([0, 1], size=5000, p=[0.3, 0.7])}
    reference = prepare_reference(ref, categorical={"label"}, prediction="label")
    report = compute_drift(reference, cur)
    assert [f.name for f in report.features] == ["a"]
    assert report.prediction is not None and report.prediction.kind == "categorical"
    assert report.prediction.status == Status.DRIFT
    assert report.share_drifted == 0.0 and report.drifted is False
    assert strict_json(report)["prediction"]["status"] == "drift"

    scores = prepare_reference({"score": rng.uniform(size=400)}, prediction="score")
    result = compute_drift(scores, {"score": rng.uniform(size=400) ** 3})
    assert result.prediction.kind == "numeric" and result.prediction.status == Status.DRIFT
    assert result.share_drifted is None


# --- statuses and thresholds ------------------------------------------------------------------


def test_thresholds_set_status_and_can_be_overridden_per_feature():
    rng = np.random.default_rng(11)
    ref = {"same": rng.normal(size=4000), "moved": rng.normal(size=4000)}
    cur = {"same": rng.normal(size=4000), "moved": rng.normal(0.2, 1, size=4000)}
    reference = prepare_reference(ref)
    report = compute_drift(reference, cur)
    assert report.feature("same").status == Status.OK
    assert report.feature("moved").status == Status.DRIFT  # W/σ ≈ 0.2 ≥ 0.1
    assert "Wasserstein/σ" in report.feature("moved").reason
    lenient = Thresholds(wasserstein=0.5, psi_warning=0.03, psi_drift=1.0)
    report = compute_drift(reference, cur, feature_thresholds={"moved": lenient})
    moved = report.feature("moved")
    assert moved.psi >= 0.03
    assert moved.status == Status.WARNING and "PSI" in moved.reason
    with pytest.raises(ValueError):
        compute_drift(reference, cur, feature_thresholds={"nope": lenient})
    with pytest.raises(ValueError):
        Thresholds(psi_warning=0.3, psi_drift=0.2)


def test_psi_warning_and_drift_bands():
    rng = np.random.default_rng(12)
    ref = rng.normal(size=20_000)
    no_w = Thresholds(wasserstein=100)
    for shift, status in [(0.0, Status.OK), (0.35, Status.WARNING), (0.7, Status.DRIFT)]:
        f = one(ref, rng.normal(shift, 1, size=20_000), thresholds=no_w)
        assert f.status == status, (shift, f.psi, f.reason)


def test_missing_share_change_gives_a_warning():
    rng = np.random.default_rng(13)
    ref = rng.normal(size=1000)
    cur = rng.normal(size=1000)
    cur[:300] = np.nan
    f = one(ref, cur)
    assert f.missing_share_reference == 0 and f.missing_share_current == pytest.approx(0.3)
    assert f.status == Status.WARNING and "missing share" in f.reason


@pytest.mark.parametrize(("drifted", "share", "expected"), [(2, 0.5, True), (1, 0.5, False)])
def test_dataset_drift_share(drifted, share, expected):
    rng = np.random.default_rng(14)
    ref = {f"f{i}": rng.normal(size=1000) for i in range(4)}
    cur = {f"f{i}": rng.normal(3 if i < drifted else 0, 1, size=1000) for i in range(4)}
    cur["f3"] = cur["f3"][:5]  # insufficient data: left out of the share
    report = compute_drift(prepare_reference(ref), cur, drift_share=share)
    assert report.n_evaluated == 3
    assert report.n_drifted == drifted
    assert report.share_drifted == pytest.approx(drifted / 3)
    assert report.drifted is expected
    assert "with insufficient data" in report.reason


# --- edge cases: never crash, never NaN -------------------------------------------------------


def test_all_null_columns():
    f = one([None] * 50, [1.0] * 50)
    assert f.status == Status.INSUFFICIENT and "reference has no usable values" in f.reason
    assert f.missing_share_reference == 1.0
    f = one(np.arange(50.0), [np.nan] * 60)
    assert f.status == Status.INSUFFICIENT and "current window has no usable" in f.reason
    assert f.missing_share_current == 1.0 and f.psi is None
    f = one([None] * 50, [None] * 50, categorical=True)
    assert f.status == Status.INSUFFICIENT


def test_constant_reference_leaves_normalised_wasserstein_undefined():
    rng = np.random.default_rng(15)
    ref, cur = np.full(100, 3.0), rng.normal(3, 1, size=100)
    f = one(ref, cur)
    assert f.wasserstein_normalised is None
    assert "standard deviation 0" in f.reason
    assert f.wasserstein == pytest.approx(wasserstein_distance(ref, cur), abs=TOL)
    assert f.ks == pytest.approx(ks_2samp(ref, cur).statistic, abs=TOL)
    assert f.psi == pytest.approx(reference_psi(ref, cur), abs=TOL)
    assert f.psi > 0.25 and f.status == Status.DRIFT  # the constant's own bin empties
    same = one(np.full(100, 3.0), np.full(100, 3.0))
    assert same.status == Status.OK and same.psi == 0.0 and same.ks == 0.0
    assert same.wasserstein == 0.0 and same.wasserstein_normalised is None
    large = one(np.full(100_000, 3.0), np.full(150_000, 4.0), exact_limit=0)
    assert large.ks == 1.0 and large.status == Status.DRIFT and large.psi > 0.25
    assert large.wasserstein == pytest.approx(1.0, abs=1e-9)


def test_small_windows_are_insufficient_data():
    rng = np.random.default_rng(16)
    ref = rng.normal(size=500)
    f = one(ref, [1.5])
    assert f.status == Status.INSUFFICIENT
    assert "1 usable values, fewer than min_rows=30" in f.reason
    f = one(ref, rng.normal(size=10), min_rows=5)
    assert f.status != Status.INSUFFICIENT and f.ks is not None
    f = one([2.0], [2.0], min_rows=1)  # a single row on each side computes without NaN
    assert f.psi == 0.0 and f.ks == 0.0 and f.wasserstein_normalised is None
    f = one(ref, np.empty(0))
    assert f.status == Status.INSUFFICIENT and f.reason == "the current window has no rows"
    assert f.missing_share_current is None
    f = one(["a"] * 40, [], categorical=True)
    assert f.status == Status.INSUFFICIENT and f.reason == "the current window has no rows"


def test_empty_current_window_and_missing_columns():
    rng = np.random.default_rng(17)
    reference = prepare_reference({"a": rng.normal(size=100), "b": rng.choice(["u", "v"], 100)})
    report = compute_drift(reference, {"a": np.empty(0)})
    assert report.share_drifted is None and report.drifted is False
    assert report.reason == "no feature has enough data to judge drift"
    assert report.feature("b").reason == "the column is not in the current window"
    assert strict_json(report)["share_drifted"] is None


def test_infinities_are_left_out_and_reported():
    rng = np.random.default_rng(18)
    ref = np.concatenate([rng.normal(size=400), [np.inf, -np.inf] * 50])
    cur = np.concatenate([rng.normal(size=300), [np.inf] * 100, [np.nan] * 100])
    f = one(ref, cur)
    finite_ref, finite_cur = ref[np.isfinite(ref)], cur[np.isfinite(cur)]
    assert f.inf_share_reference == pytest.approx(0.2)
    assert f.inf_share_current == pytest.approx(0.2)
    assert f.missing_share_current == pytest.approx(0.2)
    assert f.n_reference_used == 400 and f.n_current_used == 300
    assert f.ks == pytest.approx(ks_2samp(finite_ref, finite_cur).statistic, abs=TOL)
    assert f.wasserstein_normalised == pytest.approx(
        wasserstein_distance(finite_ref, finite_cur) / np.std(finite_ref), abs=TOL
    )
    assert f.psi == pytest.approx(reference_psi(finite_ref, finite_cur), abs=TOL)
    assert "±inf" in f.reason
    f = one(ref, [np.inf] * 100)
    assert f.status == Status.INSUFFICIENT


def test_unseen_categories_only():
    f = one(["a", "b"] * 30, ["c", "d"] * 30, categorical=True)
    assert f.status == Status.DRIFT and f.jensen_shannon == pytest.approx(1.0)
    assert f.new_categories == ["c", "d"] and f.new_category_share == 1.0


def test_inputs_as_dataframe_and_with_none():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(19)
    ref = pd.DataFrame({"num": rng.normal(size=100), "cat": rng.choice(["p", "q"], 100)})
    cur = pd.DataFrame({"num": [None, *rng.normal(size=99)], "cat": ["p", None] * 50})
    report = compute_drift(prepare_reference(ref), cur)
    num, cat = report.feature("num"), report.feature("cat")
    assert num.kind == "numeric" and num.missing_share_current == pytest.approx(0.01)
    assert cat.kind == "categorical" and cat.missing_share_current == pytest.approx(0.5)
    strict_json(report)


def test_text_in_a_numeric_column_raises_a_clear_error():
    reference = prepare_reference({"x": np.arange(50.0)})
    with pytest.raises(ValueError, match="declare it categorical"):
        compute_drift(reference, {"x": np.array(["a"] * 50)})


def test_reference_is_reusable_and_single_threaded_gives_the_same_result():
    rng = np.random.default_rng(20)
    ref = {f"f{i}": rng.normal(size=3000) for i in range(5)}
    reference = prepare_reference(ref, workers=1)
    windows = [{k: rng.normal(i * 0.1, 1, size=2000) for k in ref} for i in range(3)]
    first = [compute_drift(reference, w).as_dict() for w in windows]
    again = [compute_drift(reference, w, workers=1).as_dict() for w in windows]
    assert first == again
    assert reference.columns["f0"].values.flags.writeable is False

"""Rollups: mergeable figures equal scikit-learn's on the same rows, late labels recompute their
window, undefined figures stay undefined, and drift windows compare against the training
sample logged with the model."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sklearn import metrics as skm

from monitoring import metrics, rollups
from monitoring.models import DriftBaseline, DriftRollup, Rollup, StaleWindow
from monitoring.services import FeedbackItem, feedback_record
from registry.demo_models import breast_cancer_split
from registry.models import ModelVersion, RegisteredModel
from rollouts import services
from rollouts.models import Environment, PredictionLog, ServingError
from tests.conftest import REGISTERED_MODEL

HOUR0 = datetime(2026, 3, 2, 10, tzinfo=UTC)


# --- pure figures ------------------------------------------------------------------------------


def _confusion(y_true, y_pred) -> metrics.Confusion:
    confusion = metrics.Confusion()
    for t, p in zip(y_true, y_pred, strict=True):
        confusion.add(int(t), int(p))
    return confusion


def test_binary_figures_equal_scikit_learn():
    rng = np.random.default_rng(7)
    n, bins = 180, metrics.SCORE_BINS
    y_true = rng.integers(0, 2, n)
    y_pred = np.where(rng.random(n) < 0.8, y_true, 1 - y_true)
    scores = (rng.permutation(bins)[:n] + 0.5) / bins  # distinct bins: AUC exact
    pos, neg = metrics.score_histograms(scores, (y_true == 1).tolist())

    q = metrics.classification_quality(_confusion(y_true, y_pred), pos, neg)

    assert q.average == "binary"
    assert q.accuracy == pytest.approx(skm.accuracy_score(y_true, y_pred), abs=1e-12)
    assert q.precision == pytest.approx(skm.precision_score(y_true, y_pred), abs=1e-12)
    assert q.recall == pytest.approx(skm.recall_score(y_true, y_pred), abs=1e-12)
    assert q.f1 == pytest.approx(skm.f1_score(y_true, y_pred), abs=1e-12)
    assert q.roc_auc == pytest.approx(skm.roc_auc_score(y_true, scores), abs=1e-12)


def test_multiclass_figures_are_macro_averages_like_scikit_learn():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 3, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 3, 300))

    q = metrics.classification_quality(_confusion(y_true, y_pred))

    assert q.average == "macro"
    for name in ("precision", "recall", "f1"):
        expected = getattr(skm, f"{name}_score")(y_true, y_pred, average="macro")
        assert getattr(q, name) == pytest.approx(expected, abs=1e-12)
    assert q.roc_auc is None and "binary" in q.undefined["roc_auc"]
    assert _confusion(y_true, y_pred).matrix == skm.confusion_matrix(y_true, y_pred).tolist()


def test_figures_without_labels_or_with_one_class_are_undefined_not_zero():
    empty = metrics.classification_quality(metrics.Confusion())
    assert empty.accuracy is None and empty.f1 is None
    assert empty.undefined["accuracy"] == "no labeled predictions yet"

    # only negatives, all predicted negative: accuracy 1, precision/recall/AUC undefined
    only_negatives = metrics.classification_quality(
        _confusion([0, 0, 0], [0, 0, 0]), [0] * 1000, [3] + [0] * 999
    )
    assert only_negatives.accuracy == 1.0
    assert only_negatives.precision is None and only_negatives.recall is None
    assert only_negatives.f1 is None and only_negatives.roc_auc is None
    assert only_negatives.undefined["precision"] == "no row is labeled or predicted positive"

    assert metrics.regression_quality(0, 0.0, 0.0).rmse is None


def test_regression_figures_equal_scikit_learn():
    rng = np.random.default_rng(1)
    y, y_hat = rng.normal(size=200), rng.normal(size=200)
    q = metrics.regression_quality(
        200, float(((y - y_hat) ** 2).sum()), float(abs(y - y_hat).sum())
    )
    assert q.rmse == pytest.approx(skm.root_mean_squared_error(y, y_hat), abs=1e-12)
    assert q.mae == pytest.approx(skm.mean_absolute_error(y, y_hat), abs=1e-12)


def test_latency_percentiles_from_the_histogram_are_within_the_bucket_error():
    rng = np.random.default_rng(5)
    latencies = rng.lognormal(mean=2.0, sigma=0.8, size=20_000)
    histogram = metrics.latency_histogram(latencies)
    for q in (50, 95, 99):
        estimate = metrics.latency_percentile(histogram, q)
        assert estimate == pytest.approx(np.percentile(latencies, q), rel=0.09)
    assert metrics.latency_percentile(metrics.latency_histogram([]), 50) is None
    assert sum(metrics.latency_histogram([1.0, float("nan"), float("inf")])) == 1


def test_binned_roc_auc_stays_within_the_tied_pairs_bound():
    rng = np.random.default_rng(11)
    y_true = rng.integers(0, 2, 5000)
    scores = np.clip(rng.normal(0.35 + 0.3 * y_true, 0.2), 0, 1)
    pos, neg = metrics.score_histograms(scores, (y_true == 1).tolist())
    p, q = np.asarray(pos, float), np.asarray(neg, float)
    tied_share = float((p * q).sum() / (p.sum() * q.sum()))
    assert metrics.roc_auc_from_histograms(pos, neg) == pytest.approx(
        skm.roc_auc_score(y_true, scores), abs=tied_share / 2
    )


def test_histograms_with_different_trailing_zeros_merge():
    short, long = metrics.latency_histogram([1.0]), metrics.latency_histogram([1.0, 900.0])
    assert len(short) < len(long)
    merged = metrics.add_histograms(metrics.add_histograms(np.zeros(0, dtype=int), short), long)
    assert merged.sum() == 3 and metrics.latency_percentile(merged, 99) > 800


# --- rollups from the log ----------------------------------------------------------------------


@pytest.fixture
def churn(team):
    now = datetime.now(UTC)
    registered = RegisteredModel.objects.create(name="churn", team=team, synced_at=now)
    signature = {"inputs": [{"name": "x", "type": "double"}], "outputs": [{"type": "long"}]}
    v1 = ModelVersion.objects.create(
        registered_model=registered, version=1, status="READY", synced_at=now, signature=signature
    )
    endpoint = services.endpoint_for(
        model_version=v1, environment=Environment.objects.get(name="staging")
    )
    return endpoint, v1


def _log(endpoint, version, at, prediction, *, score=None, features=None, latency=10.0, rows=1):
    request_id = uuid.uuid4()
    PredictionLog.objects.bulk_create(
        [
            PredictionLog(
                request_id=request_id,
                row_index=i,
                endpoint=endpoint,
                model_version=version,
                features=features or {"x": 1.0},
                prediction=prediction,
                score=score,
                latency_ms=latency,
                created_at=at,
            )
            for i in range(rows)
        ]
    )
    rollups.windows_mark_stale([(endpoint.pk, version.pk, at)])
    return request_id


def test_an_hour_rolls_up_counts_latency_errors_and_its_day(churn):
    endpoint, v1 = churn
    for minute, latency in enumerate([5.0, 10.0, 20.0]):
        _log(endpoint, v1, HOUR0 + timedelta(minutes=minute), 1, latency=latency, rows=2)
    _log(endpoint, v1, HOUR0 + timedelta(hours=1), 0, latency=40.0)
    ServingError.objects.create(
        request_id=uuid.uuid4(),
        endpoint=endpoint,
        model_version=v1,
        status_code=400,
        error_code="BAD_REQUEST",
        created_at=HOUR0,
    )

    result = rollups.rollups_refresh()

    assert (result.hours, result.days) == (2, 1)
    hour = Rollup.objects.get(granularity="hour", window_start=HOUR0)
    assert (hour.requests, hour.rows, hour.errors, hour.labeled) == (3, 6, 1, 0)
    assert metrics.latency_percentile(hour.latency_hist, 50) == pytest.approx(10.0, rel=0.09)
    day = Rollup.objects.get(granularity="day", window_start=HOUR0.replace(hour=0))
    assert (day.requests, day.rows, day.errors) == (4, 7, 1)
    assert not StaleWindow.objects.exists()


def test_late_labels_recompute_their_window_and_coverage(churn):
    endpoint, v1 = churn
    ids = [
        _log(endpoint, v1, HOUR0, p, score=s) for p, s in [(1, 0.9), (0, 0.2), (1, 0.7), (0, 0.4)]
    ]
    rollups.rollups_refresh()
    before = Rollup.objects.get(granularity="hour", window_start=HOUR0)
    assert before.labeled == 0
    assert metrics.classification_quality(metrics.Confusion(before.confusion)).accuracy is None

    # labels arrive weeks later, for three of the four predictions
    feedback_record(
        items=[
            FeedbackItem(request_id=ids[0], label=1),
            FeedbackItem(request_id=ids[1], label=1),
            FeedbackItem(request_id=ids[2], label=1),
        ]
    )
    assert StaleWindow.objects.filter(hour=HOUR0).exists()
    rollups.rollups_refresh()

    after = Rollup.objects.get(granularity="hour", window_start=HOUR0)
    assert after.labeled == 3 and after.labeled / after.rows == 0.75  # label coverage
    q = metrics.classification_quality(
        metrics.Confusion(after.confusion), after.score_pos_hist, after.score_neg_hist
    )
    assert q.accuracy == pytest.approx(2 / 3)
    assert q.roc_auc is None  # every labeled row is positive
    assert q.undefined["roc_auc"] == "needs labeled, scored rows of both classes"


def test_labels_by_the_clients_inference_id_take_its_latest_request(churn):
    endpoint, v1 = churn
    first = _log(endpoint, v1, HOUR0, 1)
    latest = _log(endpoint, v1, HOUR0 + timedelta(minutes=5), 0)
    PredictionLog.objects.filter(request_id__in=[first, latest]).update(inference_id="order-9")

    result = feedback_record(items=[FeedbackItem(inference_id="order-9", label=0)])

    assert result.accepted == 1
    labeled = PredictionLog.objects.get(ground_truth__isnull=False)
    assert labeled.request_id == latest
    assert feedback_record(items=[FeedbackItem(inference_id="nope", label=0)]).unknown == ["nope"]


def test_a_mark_made_while_refreshing_survives_the_refresh(churn, monkeypatch):
    endpoint, v1 = churn
    _log(endpoint, v1, HOUR0, 1)
    real = rollups.refresh_window

    def refresh_and_log_meanwhile(endpoint_id, version, hour):
        real(endpoint_id, version, hour)
        _log(endpoint, v1, HOUR0 + timedelta(minutes=30), 1)  # arrives during the refresh

    monkeypatch.setattr(rollups, "refresh_window", refresh_and_log_meanwhile)
    rollups.rollups_refresh(with_drift=False)
    monkeypatch.setattr(rollups, "refresh_window", real)

    assert StaleWindow.objects.filter(hour=HOUR0).exists()
    rollups.rollups_refresh(with_drift=False)
    assert Rollup.objects.get(granularity="hour", window_start=HOUR0).requests == 2


def test_a_regressor_rolls_up_rmse_and_mae(churn):
    endpoint, v1 = churn
    v1.signature = {"inputs": [], "outputs": [{"type": "double"}]}
    v1.save()
    ids = [_log(endpoint, v1, HOUR0, p) for p in (1.5, 2.0, 4.0)]
    feedback_record(
        items=[
            FeedbackItem(request_id=i, label=y) for i, y in zip(ids, (1.0, 2.0, 2.0), strict=True)
        ]
    )

    rollups.rollups_refresh(with_drift=False)

    hour = Rollup.objects.get(granularity="hour", window_start=HOUR0)
    q = metrics.regression_quality(hour.labeled, hour.squared_error_sum, hour.absolute_error_sum)
    assert hour.task == "regression"
    assert q.rmse == pytest.approx(skm.root_mean_squared_error([1, 2, 2], [1.5, 2, 4]))
    assert q.mae == pytest.approx(skm.mean_absolute_error([1, 2, 2], [1.5, 2, 4]))


# --- drift windows -----------------------------------------------------------------------------


def _features(frame) -> list[dict]:
    return frame.to_dict(orient="records")


def test_drift_window_against_the_training_sample_flags_shifted_features(synced):
    v1 = ModelVersion.objects.get(registered_model__name=REGISTERED_MODEL, version=1)
    endpoint = services.endpoint_for(
        model_version=v1, environment=Environment.objects.get(name="staging")
    )
    held_out = breast_cancer_split().X_test.head(120).copy()
    held_out["mean radius"] *= 1.6  # a real shift of one feature
    for i, record in enumerate(_features(held_out)):
        _log(endpoint, v1, HOUR0 + timedelta(seconds=i), 1, features=record)

    rollups.rollups_refresh()

    window = DriftRollup.objects.get(granularity="hour", window_start=HOUR0)
    assert window.rows == 120
    assert "training sample of v1" in window.reference
    by_name = {f["name"]: f for f in window.result["features"]}
    assert by_name["mean radius"]["status"] == "drift"
    assert by_name["mean radius"]["psi"] > 0.25
    assert window.result["prediction"]["name"] == "prediction"
    chart = window.histograms["mean radius"]
    assert len(chart["edges"]) == rollups.HISTOGRAM_BINS + 1
    assert sum(chart["reference"]) == pytest.approx(1.0)
    assert sum(chart["current"]) == pytest.approx(1.0)
    assert DriftRollup.objects.filter(
        granularity="day", window_start=HOUR0.replace(hour=0)
    ).exists()


def test_a_window_too_small_for_drift_says_insufficient_data(synced):
    v1 = ModelVersion.objects.get(registered_model__name=REGISTERED_MODEL, version=1)
    endpoint = services.endpoint_for(
        model_version=v1, environment=Environment.objects.get(name="staging")
    )
    record = _features(breast_cancer_split().X_test.head(1))[0]
    _log(endpoint, v1, HOUR0, 1, features=record)

    rollups.rollups_refresh()

    window = DriftRollup.objects.get(granularity="hour", window_start=HOUR0)
    assert window.drifted is None and window.share_drifted is None
    assert {f["status"] for f in window.result["features"]} == {"insufficient data"}
    assert window.result["reason"] == "no feature has enough data to judge drift"


def test_a_version_without_reference_or_baseline_reports_why(churn):
    endpoint, v1 = churn  # no MLflow run behind it
    _log(endpoint, v1, HOUR0, 1)

    rollups.rollups_refresh()

    window = DriftRollup.objects.get(granularity="hour", window_start=HOUR0)
    assert window.drifted is None
    assert "no reference sample and no baseline window" in window.result["reason"]


def test_a_chosen_baseline_window_becomes_the_reference(churn):
    endpoint, v1 = churn
    rng = np.random.default_rng(0)
    base = HOUR0 - timedelta(days=1)
    for i, x in enumerate(rng.normal(0, 1, 60)):
        _log(endpoint, v1, base + timedelta(seconds=i), 1, features={"x": float(x)})
    for i, x in enumerate(rng.normal(3, 1, 60)):
        _log(endpoint, v1, HOUR0 + timedelta(seconds=i), 1, features={"x": float(x)})
    DriftBaseline.objects.create(
        endpoint=endpoint,
        model_version=v1,
        start=base,
        end=base + timedelta(hours=1),
        chosen_at=base,
    )

    rollups.rollups_refresh()

    shifted = DriftRollup.objects.get(granularity="hour", window_start=HOUR0)
    assert shifted.reference.startswith("baseline window")
    assert shifted.drifted is True
    same = DriftRollup.objects.get(granularity="hour", window_start=base)
    assert same.drifted is False


def test_choosing_a_baseline_is_checked_audited_and_recomputes_the_versions_windows(
    churn, data_scientist, other_data_scientist, team
):
    from django.core.exceptions import PermissionDenied, ValidationError

    from monitoring.services import drift_baseline_clear, drift_baseline_set
    from portal.models import AuditEvent

    endpoint, v1 = churn
    base = HOUR0 - timedelta(days=1)
    for i in range(40):
        _log(endpoint, v1, base + timedelta(seconds=i), 1, features={"x": float(i)})
    rollups.rollups_refresh(with_drift=False)
    assert not StaleWindow.objects.exists()

    with pytest.raises(PermissionDenied):
        drift_baseline_set(
            actor=other_data_scientist, endpoint=endpoint, model_version=v1, start=base, end=HOUR0
        )
    with pytest.raises(ValidationError, match="end after it starts"):
        drift_baseline_set(
            actor=data_scientist, endpoint=endpoint, model_version=v1, start=HOUR0, end=base
        )
    with pytest.raises(ValidationError, match="holds 0 predictions of v1; a baseline needs"):
        drift_baseline_set(
            actor=data_scientist,
            endpoint=endpoint,
            model_version=v1,
            start=HOUR0,
            end=HOUR0 + timedelta(hours=1),
        )
    assert not DriftBaseline.objects.exists()

    drift_baseline_set(
        actor=data_scientist, endpoint=endpoint, model_version=v1, start=base, end=HOUR0
    )

    assert DriftBaseline.objects.get().chosen_by == data_scientist
    assert AuditEvent.objects.filter(action="drift.baseline_set").count() == 1
    assert StaleWindow.objects.filter(hour=base).exists()  # compared again with the baseline
    assert drift_baseline_clear(actor=data_scientist, endpoint=endpoint, model_version=v1)
    assert not drift_baseline_clear(actor=data_scientist, endpoint=endpoint, model_version=v1)
    assert AuditEvent.objects.filter(action="drift.baseline_cleared").count() == 1


def test_drift_settings_in_the_admin_are_checked_audited_and_recompute_windows(
    client, churn, platform_admin
):
    from monitoring.models import DriftSettings
    from portal.models import AuditEvent

    endpoint, v1 = churn
    _log(endpoint, v1, HOUR0, 1)
    rollups.rollups_refresh(with_drift=False)
    client.force_login(platform_admin)
    url = "/admin/monitoring/driftsettings/add/"
    form = {
        "endpoint": endpoint.pk,
        "psi_warning": 0.3,
        "psi_drift": 0.2,  # below the warning: refused
        "wasserstein": 0.1,
        "jensen_shannon": 0.1,
        "missing_change": 0.1,
        "drift_share": 0.5,
        "feature_thresholds": "{}",
    }
    refused = client.post(url, form)
    assert (
        refused.status_code == 200
        and "psi_warning must not exceed psi_drift" in refused.content.decode()
    )
    refused = client.post(
        url, {**form, "psi_drift": 0.5, "feature_thresholds": '{"x": {"psi": 1}}'}
    )
    assert "must map some of psi_warning" in refused.content.decode()
    assert not DriftSettings.objects.exists()

    saved = client.post(
        url, {**form, "psi_drift": 0.5, "feature_thresholds": '{"x": {"psi_drift": 0.9}}'}
    )

    assert saved.status_code == 302
    assert DriftSettings.objects.get().feature_thresholds == {"x": {"psi_drift": 0.9}}
    assert AuditEvent.objects.filter(action="drift.settings_saved").count() == 1
    assert StaleWindow.objects.filter(hour=HOUR0).exists()
    base, per_feature, share = rollups.thresholds_for(endpoint.pk)
    assert (base.psi_warning, per_feature["x"].psi_drift, share) == (0.3, 0.9, 0.5)

"""The canary verdicts (``monitoring.canary``), checked as decisions by simulation: a canary as
good as stable is failed in at most ``alpha`` of the trials over a four-step rollout, at small
and large samples; a clearly worse one is failed in at least 90 %; too little data is never a
pass. And the figures read from the prediction log."""

from __future__ import annotations

import uuid
from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone

from monitoring.canary import PredictionLogAnalysis
from monitoring.models import GroundTruth
from rollouts import analysis
from rollouts.analysis import AnalysisPolicy, WindowFigures
from rollouts.models import PredictionLog, ServingError

JUDGE = PredictionLogAnalysis().judge
POLICY = AnalysisPolicy()  # alpha 0.05 over the rollout
LOOKS = 4  # 10 -> 25 -> 50 -> 100 %
TRIALS = 400
#: latency: a lognormal around 20 ms, as a scoring endpoint's
MU, SIGMA = np.log(20.0), 0.5


def _figures(rng, n: int, error_rate: float, accuracy: float, labels: int, slower: float = 1.0):
    errors = int(rng.binomial(n, error_rate))
    return WindowFigures(
        requests=n,
        errors=errors,
        latencies_ms=slower * rng.lognormal(MU, SIGMA, n - errors),
        labelled=labels,
        correct=int(rng.binomial(labels, accuracy)),
    )


def _flat(n: int, ms: float = 10.0) -> tuple[float, ...]:
    return (ms,) * n


def _rollouts_failed(rng, n, canary, stable, labels=None, trials=TRIALS, looks=LOOKS):
    """The share of simulated rollouts failed at one of their ``looks`` verdicts, each on a
    fresh window of ``n`` requests a side."""
    labels = labels if labels is not None else min(n, 5000)
    failed = 0
    for _ in range(trials):
        for _ in range(looks):
            c = _figures(rng, n, *canary, labels=labels)
            s = _figures(rng, n, *stable, labels=labels)
            if JUDGE(c, s, POLICY, looks=looks).outcome == "fail":
                failed += 1
                break
    return failed / trials


@pytest.mark.parametrize(("n", "trials"), [(200, 400), (250, 400), (1_000, 400), (100_000, 100)])
def test_a_canary_as_good_as_stable_is_rarely_failed(n, trials):
    rng = np.random.default_rng(n)
    share = _rollouts_failed(rng, n, (0.02, 0.9), (0.02, 0.9), trials=trials)
    # Over a whole rollout (four looks): at most alpha. With 400 trials the binomial standard
    # error at 5 % is 1.1 points; Bonferroni keeps the true rate well below (about 1 %).
    assert share <= POLICY.alpha, share


@pytest.mark.parametrize(("n", "trials"), [(1_000, 400), (100_000, 100)])
def test_a_canary_worse_only_within_the_margins_is_rarely_failed(n, trials):
    rng = np.random.default_rng(7 + n)
    # error rate +0.2 points (margin 0.5), accuracy -1 point (margin 2), same latency
    share = _rollouts_failed(rng, n, (0.022, 0.89), (0.02, 0.9), trials=trials)
    assert share <= POLICY.alpha, share


@pytest.mark.parametrize(
    ("n", "canary", "labels", "why"),
    [
        (1_000, (0.06, 0.9), None, "error rate 6 % against 2 %"),
        (200, (0.02, 0.5), 200, "a model trained on shuffled labels: accuracy 50 % against 90 %"),
        (1_000, (0.02, 0.82), 1_000, "accuracy 82 % against 90 %"),
    ],
)
def test_a_clearly_worse_canary_is_failed(n, canary, labels, why):
    rng = np.random.default_rng(11)
    share = _rollouts_failed(rng, n, canary, (0.02, 0.9), labels=labels, trials=200, looks=1)
    assert share >= 0.9, (why, share)


def test_a_canary_half_as_slow_again_is_failed_on_latency():
    rng = np.random.default_rng(13)
    failed = 0
    for _ in range(200):
        c = _figures(rng, 1_000, 0.02, 0.9, labels=1_000, slower=1.5)
        s = _figures(rng, 1_000, 0.02, 0.9, labels=1_000)
        checks = JUDGE(c, s, POLICY, looks=LOOKS).checks
        failed += any(ch.metric == "latency_p95" and ch.outcome == "fail" for ch in checks)
    assert failed / 200 >= 0.9


def test_a_canary_twice_as_slow_fails_on_p95_and_says_so():
    rng = np.random.default_rng(3)
    c = _figures(rng, 500, 0.02, 0.9, labels=500, slower=2.0)
    s = _figures(rng, 500, 0.02, 0.9, labels=500)
    verdict = JUDGE(c, s, POLICY, looks=LOOKS)
    assert verdict.outcome == "fail"
    (check,) = [c for c in verdict.checks if c.outcome == "fail"]
    assert check.metric == "latency_p95" and "p95 latency" in verdict.reason


@pytest.mark.parametrize(
    ("canary", "stable", "metric"),
    [
        (WindowFigures(requests=50, errors=0, latencies_ms=_flat(50 - 0)), None, "error_rate"),
        (WindowFigures(), None, "error_rate"),
        (
            WindowFigures(
                requests=5_000, errors=10, latencies_ms=_flat(5_000), labelled=20, correct=20
            ),
            None,
            "accuracy",
        ),
    ],
)
def test_too_little_data_is_inconclusive_never_a_pass(canary, stable, metric):
    stable = stable or WindowFigures(
        requests=5_000, errors=100, latencies_ms=_flat(4_900), labelled=1_000, correct=900
    )
    verdict = JUDGE(canary, stable, POLICY, looks=LOOKS)
    assert verdict.outcome == "inconclusive"
    assert metric in {c.metric for c in verdict.checks if c.outcome == "inconclusive"}
    assert "needed" in verdict.reason


def test_without_required_labels_a_perfect_canary_is_still_inconclusive():
    perfect = WindowFigures(requests=10_000, errors=0, latencies_ms=_flat(10_000 - 0))
    stable = WindowFigures(requests=10_000, errors=200, latencies_ms=_flat(10_000 - 200))
    assert JUDGE(perfect, stable, POLICY, looks=1).outcome == "inconclusive"
    relaxed = AnalysisPolicy(require_labels=False)
    assert JUDGE(perfect, stable, relaxed, looks=1).outcome == "pass"


def test_a_clearly_worse_canary_fails_even_with_no_labels_yet():
    bad = WindowFigures(requests=2_000, errors=400, latencies_ms=_flat(2_000 - 400))
    stable = WindowFigures(requests=2_000, errors=20, latencies_ms=_flat(2_000 - 20))
    verdict = JUDGE(bad, stable, POLICY, looks=LOOKS)
    assert verdict.outcome == "fail" and "error rate 20.00%" in verdict.reason


@pytest.mark.parametrize(("noise", "expect_fail"), [(1.0, False), (1.6, True)])
def test_regressors_are_judged_on_rmse(noise, expect_fail):
    rng = np.random.default_rng(5)
    failed = 0
    for _ in range(200):
        sc = tuple((rng.normal(0, 2.0 * noise, 400)) ** 2)
        ss = tuple((rng.normal(0, 2.0, 400)) ** 2)

        def fig(sq):
            return WindowFigures(
                requests=400,
                latencies_ms=_flat(400),
                labelled=400,
                task="regression",
                squared_errors=sq,
            )

        verdict = JUDGE(fig(sc), fig(ss), POLICY, looks=LOOKS)
        assert {c.metric for c in verdict.checks} == {"error_rate", "latency_p95", "rmse"}
        failed += verdict.outcome == "fail"
    if expect_fail:
        assert failed / 200 >= 0.9
    else:
        assert failed / 200 <= POLICY.alpha


@pytest.mark.parametrize(
    "bad",
    [
        {"alpha": 0},
        {"alpha": 1.5},
        {"min_requests": 0},
        {"error_rate_margin": -0.1},
        {"accuracy_margin": 1.0},
        {"p95_tolerance": -1},
    ],
)
def test_an_impossible_policy_is_refused(bad):
    with pytest.raises(ValueError):
        AnalysisPolicy(**bad)
    with pytest.raises(ValueError, match="looks"):
        JUDGE(WindowFigures(), WindowFigures(), POLICY, looks=0)


def test_the_verdict_keeps_its_figures_for_the_record():
    c = WindowFigures(
        requests=1_000, errors=60, latencies_ms=_flat(940, 12.0), labelled=500, correct=450
    )
    s = WindowFigures(
        requests=1_000, errors=20, latencies_ms=_flat(980, 11.0), labelled=500, correct=460
    )
    record = JUDGE(c, s, POLICY, looks=4).as_dict()
    assert record["outcome"] == "fail"
    by_metric = {check["metric"]: check for check in record["checks"]}
    assert by_metric["error_rate"]["canary"] == 0.06 and by_metric["error_rate"]["stable"] == 0.02
    assert by_metric["error_rate"]["p_value"] < 0.05 / 12
    assert "alpha=0.004167" in by_metric["error_rate"]["rule"]  # 0.05 / (3 tests x 4 looks)
    assert by_metric["accuracy"]["outcome"] == "pass"


def test_monitoring_registers_the_analysis():
    assert isinstance(analysis.canary_analysis(), PredictionLogAnalysis)


def test_window_figures_are_read_from_the_log(synced, deploy):
    """Only the deployment's own rows and errors of the window count."""
    v1, _ = synced
    req = deploy(v1, "staging")
    deployment, endpoint = req.deployment, req.endpoint
    start = timezone.now().replace(microsecond=0)
    latencies = [5.0, 7.0, 9.0, 11.0, 40.0]
    for i, latency in enumerate(latencies):
        request_id = uuid.uuid4()
        for row in range(2):  # two rows a request
            log = PredictionLog.objects.create(
                request_id=request_id, row_index=row, endpoint=endpoint, model_version=v1,
                deployment=deployment, features={}, prediction=1, latency_ms=latency,
                created_at=start + timedelta(seconds=i),
            )  # fmt: skip
            if i < 3:  # labels for the first three requests: 1, 1, 0 on both rows
                GroundTruth.objects.create(prediction=log, label=int(i < 2), received_at=start)
    # outside the window, or answered by no known deployment (older rows): not counted
    PredictionLog.objects.create(
        endpoint=endpoint, model_version=v1, deployment=deployment, features={}, prediction=0,
        latency_ms=1.0, created_at=start + timedelta(minutes=10),
    )  # fmt: skip
    PredictionLog.objects.create(
        endpoint=endpoint, model_version=v1, features={}, prediction=0, latency_ms=1.0,
        created_at=start,
    )  # fmt: skip
    ServingError.objects.create(
        request_id=uuid.uuid4(), endpoint=endpoint, model_version=v1, deployment=deployment,
        status_code=422, error_code="BAD_REQUEST", created_at=start + timedelta(seconds=1),
    )  # fmt: skip
    figures = analysis.canary_analysis().window_figures(
        deployment_id=deployment.pk, start=start, end=start + timedelta(minutes=5)
    )
    assert (figures.requests, figures.errors) == (6, 1)
    assert figures.latencies_ms == tuple(latencies)
    assert figures.latency_p95_ms == pytest.approx(np.percentile(latencies, 95))
    assert (figures.labelled, figures.correct) == (6, 4)
    assert figures.accuracy == pytest.approx(4 / 6) and figures.task == "classification"

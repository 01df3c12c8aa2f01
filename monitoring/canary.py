"""The canary analysis of ``rollouts.analysis``, on the prediction log: a deployment's figures
over a step's window, and the verdict comparing canary with stable.

The checks (each one-sided: only a canary *worse* than stable fails):

- error rate, per request: the Miettinen-Nurminen score test of
  H0: p_canary - p_stable <= margin against H1: p_canary - p_stable > margin
  (``statsmodels.stats.proportion.test_proportions_2indep``, ``method="score"``; Miettinen &
  Nurminen, Statistics in Medicine 4 (1985) 213-226), which holds its level at small counts
  where the Wald test does not;
- accuracy, per labelled row (classifiers): the same test of
  H0: acc_stable - acc_canary <= margin;
- RMSE (regressors): Welch's t-test of H0: mean(se_canary) <= (1 + margin)^2 mean(se_stable) on
  the per-row squared errors (``scipy.stats.ttest_ind(equal_var=False)``);
- p95 latency: with T = (1 + ``p95_tolerance``) x stable's p95, the exact binomial test of
  H0: P(canary answer slower than T) <= 5 % (``scipy.stats.binomtest``, one-sided): a canary
  whose own p95 is past T has more than 5 % of its answers beyond it.

``alpha`` is split (Bonferroni) over the statistical checks of the verdict and the rollout's
looks, so that a canary as good as stable is failed with probability at most ``alpha`` over the
whole rollout (``tests/unit/test_canary_analysis.py`` checks this, and the power, by
simulation).
"""

from __future__ import annotations

import math
from datetime import datetime

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import test_proportions_2indep

from monitoring import metrics
from monitoring.rollups import _number, version_task
from rollouts.analysis import AnalysisPolicy, Check, Verdict, WindowFigures
from rollouts.models import Deployment, PredictionLog, ServingError

SCORE_TEST = "Miettinen-Nurminen score test, one-sided"
BINOMIAL = "exact binomial test of the share beyond the threshold, one-sided"
WELCH = "Welch t-test on squared errors, one-sided"


def _p_larger(count1: int, n1: int, count2: int, n2: int, margin: float) -> float:
    """P-value of H1: count1/n1 - count2/n2 > margin (1.0 when the data cannot show it)."""
    if count1 / n1 - count2 / n2 <= margin:
        return 1.0  # the observed difference is not even past the margin
    with np.errstate(divide="ignore", invalid="ignore"):
        result = test_proportions_2indep(
            count1, n1, count2, n2, value=margin, compare="diff", alternative="larger",
            method="score",
        )  # fmt: skip
    p = float(result.pvalue)
    return p if math.isfinite(p) else 1.0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _proportion_check(
    metric: str,
    canary: tuple[int, int],
    stable: tuple[int, int],
    *,
    worse_if_higher: bool,
    margin: float,
    minimum: int,
    unit: str,
    alpha: float,
) -> Check:
    """Compare the share ``hits / n`` of canary and stable, given as (hits, n) pairs: the
    canary fails when its share is significantly worse (higher, or lower) by more than
    ``margin``."""
    (hc, nc), (hs, ns) = canary, stable
    value_c, value_s = (hc / nc if nc else None), (hs / ns if ns else None)
    name = metric.replace("_", " ")
    order = "canary - stable" if worse_if_higher else "stable - canary"
    rule = f"{order} > {_percent(margin)} at alpha={alpha:.4g}"
    samples = {"canary": nc, "stable": ns}
    if min(nc, ns) < minimum:
        return Check(
            metric, value_c, value_s, rule, SCORE_TEST, "inconclusive",
            f"{name}: {nc} canary and {ns} stable {unit}, {minimum} needed on each side",
            samples=samples,
        )  # fmt: skip
    if worse_if_higher:
        p = _p_larger(hc, nc, hs, ns, margin)
    else:
        p = _p_larger(hs, ns, hc, nc, margin)
    return Check(
        metric, value_c, value_s, rule, SCORE_TEST, "fail" if p < alpha else "pass",
        f"{name} {_percent(value_c)} on the canary against {_percent(value_s)} on stable "
        f"(p={p:.3g})",
        p_value=p, samples=samples,
    )  # fmt: skip


def _error_rate(c: WindowFigures, s: WindowFigures, policy: AnalysisPolicy, alpha: float):
    return _proportion_check(
        "error_rate",
        (c.errors, c.requests),
        (s.errors, s.requests),
        worse_if_higher=True,
        margin=policy.error_rate_margin,
        minimum=policy.min_requests,
        unit="requests",
        alpha=alpha,
    )


def _accuracy(c: WindowFigures, s: WindowFigures, policy: AnalysisPolicy, alpha: float):
    return _proportion_check(
        "accuracy",
        (c.correct, c.labelled),
        (s.correct, s.labelled),
        worse_if_higher=False,
        margin=policy.accuracy_margin,
        minimum=policy.min_labels,
        unit="labels so far",
        alpha=alpha,
    )


def _rmse(c: WindowFigures, s: WindowFigures, policy: AnalysisPolicy, alpha: float):
    rule = f"canary RMSE > stable x {1 + policy.rmse_margin:g} at alpha={alpha:.4g}"
    nc, ns = len(c.squared_errors), len(s.squared_errors)
    samples = {"canary": nc, "stable": ns}
    if min(nc, ns) < policy.min_labels:
        return Check(
            "rmse", c.rmse, s.rmse, rule, WELCH, "inconclusive",
            f"RMSE: {nc} canary and {ns} stable labels so far, {policy.min_labels} needed on "
            "each side",
            samples=samples,
        )  # fmt: skip
    sc = np.asarray(c.squared_errors, dtype=float)
    ss = np.asarray(s.squared_errors, dtype=float) * (1 + policy.rmse_margin) ** 2
    if sc.mean() <= ss.mean():
        p = 1.0
    else:
        with np.errstate(divide="ignore", invalid="ignore"):
            p = float(stats.ttest_ind(sc, ss, equal_var=False, alternative="greater").pvalue)
        p = p if math.isfinite(p) else 0.0  # no spread and a larger mean: certainly worse
    return Check(
        "rmse", c.rmse, s.rmse, rule, WELCH, "fail" if p < alpha else "pass",
        f"RMSE {c.rmse:.4g} on the canary against {s.rmse:.4g} on stable (p={p:.3g})",
        p_value=p, samples=samples,
    )  # fmt: skip


def _latency(c: WindowFigures, s: WindowFigures, policy: AnalysisPolicy, alpha: float):
    rule = f"canary p95 > stable p95 x {1 + policy.p95_tolerance:g} at alpha={alpha:.4g}"
    samples = {"canary": len(c.latencies_ms), "stable": len(s.latencies_ms)}
    if min(samples.values()) < policy.min_requests:
        return Check(
            "latency_p95", c.latency_p95_ms, s.latency_p95_ms, rule, BINOMIAL, "inconclusive",
            f"p95 latency: {samples['canary']} canary and {samples['stable']} stable answers, "
            f"{policy.min_requests} needed on each side",
            samples=samples,
        )  # fmt: skip
    threshold = s.latency_p95_ms * (1 + policy.p95_tolerance)
    beyond = int(np.count_nonzero(np.asarray(c.latencies_ms) > threshold))
    p = float(stats.binomtest(beyond, samples["canary"], 0.05, alternative="greater").pvalue)
    return Check(
        "latency_p95", c.latency_p95_ms, s.latency_p95_ms, rule, BINOMIAL,
        "fail" if p < alpha else "pass",
        f"p95 latency {c.latency_p95_ms:.1f} ms on the canary against "
        f"{s.latency_p95_ms:.1f} ms on stable; {beyond} of {samples['canary']} canary answers "
        f"slower than {threshold:.1f} ms (p={p:.3g})",
        p_value=p, samples=samples,
    )  # fmt: skip


class PredictionLogAnalysis:
    """``rollouts.analysis.CanaryAnalysis`` on the prediction log (registered by
    ``monitoring.apps.MonitoringConfig.ready``)."""

    def window_figures(
        self, *, deployment_id: int, start: datetime, end: datetime
    ) -> WindowFigures:
        """The deployment's figures for rows it answered in ``[start, end)``, labels included
        whenever they arrived. Reads the raw log (one query per table)."""
        deployment = Deployment.objects.select_related("model_version").get(pk=deployment_id)
        task = version_task(deployment.model_version)
        window = {"deployment_id": deployment_id, "created_at__gte": start, "created_at__lt": end}
        latencies: list[float] = []
        labelled = correct = 0
        squared: list[float] = []
        rows = PredictionLog.objects.filter(**window).values_list(
            "row_index", "latency_ms", "prediction", "ground_truth__id", "ground_truth__label"
        )
        for row_index, latency, prediction, label_id, label in rows.iterator(chunk_size=5000):
            if row_index == 0:
                latencies.append(latency)
            if label_id is None:
                continue
            if task == "regression":
                y, y_hat = _number(label), _number(prediction)
                if y is not None and y_hat is not None:
                    squared.append((y - y_hat) ** 2)
            else:
                labelled += 1
                correct += metrics.label_key(label) == metrics.label_key(prediction)
        errors = ServingError.objects.filter(**window).count()
        return WindowFigures(
            requests=len(latencies) + errors,
            errors=errors,
            latencies_ms=tuple(latencies),
            labelled=labelled if task != "regression" else len(squared),
            correct=correct,
            task=task,
            squared_errors=tuple(squared),
        )

    def judge(
        self,
        canary: WindowFigures,
        stable: WindowFigures,
        policy: AnalysisPolicy,
        *,
        looks: int = 1,
    ) -> Verdict:
        """Compare ``canary`` with ``stable`` (module docstring); ``looks`` is how many verdicts
        the rollout will ask for (its analysed steps), over which ``alpha`` is split."""
        if looks < 1:
            raise ValueError("looks must be at least 1")
        labels_checked = policy.require_labels or min(canary.labelled, stable.labelled) > 0
        tests = 2 + labels_checked
        alpha = policy.alpha / (tests * looks)
        checks = [
            _error_rate(canary, stable, policy, alpha),
            _latency(canary, stable, policy, alpha),
        ]
        if labels_checked:
            quality = _rmse if canary.task == "regression" else _accuracy
            checks.append(quality(canary, stable, policy, alpha))
        outcomes = {c.outcome for c in checks}
        outcome = (
            "fail"
            if "fail" in outcomes
            else "inconclusive"
            if "inconclusive" in outcomes
            else "pass"
        )
        return Verdict(outcome, tuple(checks))

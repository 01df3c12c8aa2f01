"""Canary analysis: the interface a rollout step is judged through (issue 10).

``rollouts`` defines what a step needs (the figures of a deployment over a window, and a
verdict comparing canary with stable under a policy); ``monitoring``, which owns the
prediction log's figures, implements it and registers the implementation in its
``AppConfig.ready()`` (``monitoring.canary``). ``rollouts`` never imports ``monitoring``.

Verdicts:

- ``pass``: every required check had enough data and none found the canary worse;
- ``fail``: a check found the canary worse than stable beyond the policy's margin (the step
  aborts the rollout);
- ``inconclusive``: no check failed, but a required check lacked data (the step is extended,
  then paused for a person). No data never counts as a pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, Protocol

from django.core.exceptions import ImproperlyConfigured

Outcome = Literal["pass", "fail", "inconclusive"]


@dataclass(frozen=True)
class WindowFigures:
    """What one deployment served over a window ``[start, end)``.

    ``requests`` counts answered and failed scoring requests; ``errors`` those answered with a
    serving error (4xx from the model, 5xx). ``latencies_ms`` holds each answered request's
    server time in milliseconds. ``labelled`` counts the rows of the window whose ground truth has
    arrived; ``correct`` those a classifier predicted right; ``squared_errors`` the regressor's
    per-row squared errors (label units squared), empty for a classifier."""

    requests: int = 0
    errors: int = 0
    latencies_ms: Sequence[float] = ()  # a tuple, list or numpy array
    labelled: int = 0
    correct: int = 0
    task: Literal["classification", "regression"] = "classification"
    squared_errors: tuple[float, ...] = ()

    @property
    def latency_p95_ms(self) -> float | None:
        """The 95th percentile of ``latencies_ms`` (linear interpolation), None without any."""
        if len(self.latencies_ms) == 0:
            return None
        import numpy as np

        return float(np.percentile(self.latencies_ms, 95))

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    @property
    def accuracy(self) -> float | None:
        if self.task == "regression" or not self.labelled:
            return None
        return self.correct / self.labelled

    @property
    def rmse(self) -> float | None:
        if not self.squared_errors:
            return None
        return (sum(self.squared_errors) / len(self.squared_errors)) ** 0.5


@dataclass(frozen=True)
class AnalysisPolicy:
    """Thresholds of a canary analysis (an environment's approval policy sets them).

    ``alpha`` is the chance, per rollout, of failing a canary that is no worse than stable; it
    is split over the statistical checks of a verdict and over the rollout's ``looks``
    (Bonferroni). Margins are how much worse the canary may be before it fails: absolute for
    the error rate and accuracy (0.005 = half a percentage point), relative for RMSE and p95
    latency (0.2 = 20 %: the canary fails when significantly more than 5 % of its answers are
    slower than 1.2 times stable's p95)."""

    alpha: float = 0.05
    min_requests: int = 200
    min_labels: int = 100
    error_rate_margin: float = 0.005
    accuracy_margin: float = 0.02
    rmse_margin: float = 0.05
    p95_tolerance: float = 0.2
    require_labels: bool = True

    def __post_init__(self):
        problems = []
        if not 0 < self.alpha < 1:
            problems.append("alpha must be in (0, 1)")
        if self.min_requests < 1 or self.min_labels < 1:
            problems.append("minimum sample sizes must be at least 1")
        margins = (self.error_rate_margin, self.accuracy_margin, self.rmse_margin)
        if any(not 0 <= m < 1 for m in margins):
            problems.append("margins must be in [0, 1)")
        if not 0 <= self.p95_tolerance <= 10:
            problems.append("p95_tolerance must be in [0, 10]")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass(frozen=True)
class Check:
    """One comparison of canary with stable: the figures, the rule, the test and its result."""

    metric: str
    canary: float | None
    stable: float | None
    rule: str
    test: str
    outcome: Outcome
    reason: str
    p_value: float | None = None
    samples: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    outcome: Outcome
    checks: tuple[Check, ...]

    @property
    def reason(self) -> str:
        """The failing (else the inconclusive) checks' reasons, for a request's status."""
        for wanted in ("fail", "inconclusive"):
            reasons = [c.reason for c in self.checks if c.outcome == wanted]
            if reasons:
                return "; ".join(reasons)
        return "every check passed"

    def as_dict(self) -> dict[str, Any]:
        return {"outcome": self.outcome, "checks": [asdict(c) for c in self.checks]}


class CanaryAnalysis(Protocol):
    def window_figures(
        self, *, deployment_id: int, start: datetime, end: datetime
    ) -> WindowFigures:
        """What the deployment answered (its own log rows and errors) in ``[start, end)``."""

    def judge(
        self, canary: WindowFigures, stable: WindowFigures, policy: AnalysisPolicy, *, looks: int
    ) -> Verdict: ...


_registered: CanaryAnalysis | None = None


def register(implementation: CanaryAnalysis) -> None:
    """Called once by the implementing app's ``AppConfig.ready()``."""
    global _registered
    _registered = implementation


def canary_analysis() -> CanaryAnalysis:
    """The registered implementation. Raises ImproperlyConfigured when none is (the
    ``monitoring`` app is not installed)."""
    if _registered is None:
        raise ImproperlyConfigured("No canary analysis is registered: install 'monitoring'.")
    return _registered

"""Automated release gates. Each gate checks one property of a candidate model version, against
the live champion of the target endpoint where one exists, and returns evidence that is stored
bound to the candidate's artifact digest.

The gates run in a Celery task (``rollouts.tasks.run_gates``); nothing here touches the database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from registry import mlflow_client
from registry.compare import metric_rows, signature_diff
from registry.models import ModelVersion
from rollouts.serving.schema import InputError, parse_request, predictions_to_jsonable

MODEL_LOADS = "model_loads"
PREDICTS_ON_EXAMPLE = "predicts_on_example"
SIGNATURE_COMPATIBLE = "signature_compatible"
METRICS_WITHIN_TOLERANCE = "metrics_within_tolerance"
DIGEST_STABLE = "digest_stable"
ALL_GATES = (
    MODEL_LOADS,
    PREDICTS_ON_EXAMPLE,
    SIGNATURE_COMPATIBLE,
    METRICS_WITHIN_TOLERANCE,
    DIGEST_STABLE,
)
GATE_LABELS = {
    MODEL_LOADS: "Model loads",
    PREDICTS_ON_EXAMPLE: "Predicts on its input example",
    SIGNATURE_COMPATIBLE: "Signature compatible with the champion",
    METRICS_WITHIN_TOLERANCE: "Offline metrics within tolerance of the champion",
    DIGEST_STABLE: "Artifact digest unchanged while the gates ran",
}
# Metrics where higher is better and that the tolerance applies to, when both versions log them.
DEFAULT_GATED_METRICS = ("accuracy", "f1", "roc_auc", "precision", "recall")


@dataclass(frozen=True)
class GateOutcome:
    name: str
    passed: bool
    summary: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass(frozen=True)
class GateRun:
    artifact_digest: str
    outcomes: list[GateOutcome]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outcomes)


def run_gates(
    candidate: ModelVersion,
    champion: ModelVersion | None,
    *,
    gates: list[str] | tuple[str, ...] = ALL_GATES,
    metric_tolerance: float = 0.0,
) -> GateRun:
    """Run ``gates`` (names from ``ALL_GATES``, run in that order) on ``candidate``.

    ``champion`` is the version live on the target endpoint (``rollouts.services.champion_of``),
    None only when nothing is live there. The champion gates pass "with no champion to compare
    with" only then; a candidate that is itself the champion fails them (there is nothing to
    release, and comparing it with itself would prove nothing).

    ``metric_tolerance`` is the largest drop (absolute, in metric units) of any gated metric
    below the champion's that still passes. Never raises for a faulty model: every failure is a
    failed gate with its reason.

    Raises:
        mlflow_client.RegistryError: the candidate's artifacts cannot be read at all.
    """
    digest = mlflow_client.artifact_digest(candidate.registered_model.name, candidate.version)
    state: dict[str, Any] = {}
    checks: dict[str, Callable[[], GateOutcome]] = {
        MODEL_LOADS: lambda: _model_loads(candidate, state),
        PREDICTS_ON_EXAMPLE: lambda: _predicts_on_example(candidate, state),
        SIGNATURE_COMPATIBLE: lambda: _signature_compatible(candidate, champion),
        METRICS_WITHIN_TOLERANCE: lambda: _metrics_within_tolerance(
            candidate, champion, metric_tolerance
        ),
        DIGEST_STABLE: lambda: _digest_stable(candidate, digest),
    }
    wanted = [g for g in ALL_GATES if g in set(gates)]
    if PREDICTS_ON_EXAMPLE in wanted and MODEL_LOADS not in wanted:
        wanted.insert(0, MODEL_LOADS)  # predicting needs the loaded model
    outcomes = []
    for name in wanted:
        started = time.perf_counter()
        outcome = checks[name]()
        outcomes.append(
            GateOutcome(**{**outcome.__dict__, "seconds": round(time.perf_counter() - started, 3)})
        )
    return GateRun(digest, outcomes)


def _model_loads(candidate: ModelVersion, state: dict[str, Any]) -> GateOutcome:
    try:
        state["model"] = mlflow_client.load_pyfunc(
            candidate.registered_model.name, candidate.version
        )
    except mlflow_client.RegistryError as exc:
        return GateOutcome(MODEL_LOADS, False, str(exc)[:500])
    return GateOutcome(
        MODEL_LOADS, True, f"loaded with flavors {', '.join(candidate.flavors) or 'pyfunc'}"
    )


def _predicts_on_example(candidate: ModelVersion, state: dict[str, Any]) -> GateOutcome:
    model = state.get("model")
    if model is None:
        return GateOutcome(PREDICTS_ON_EXAMPLE, False, "skipped: the model did not load")
    if not candidate.input_example:
        return GateOutcome(
            PREDICTS_ON_EXAMPLE, False, "the version was logged without an input example"
        )
    try:
        parsed = parse_request(
            json.dumps(candidate.input_example).encode(), "application/json", candidate.signature
        )
    except InputError as exc:
        return GateOutcome(
            PREDICTS_ON_EXAMPLE,
            False,
            f"the input example does not match the signature: {exc.message}",
        )
    try:
        raw = (
            model.predict(parsed.frame, params=parsed.params)
            if parsed.params
            else model.predict(parsed.frame)
        )
        predictions = predictions_to_jsonable(raw)
    except Exception as exc:  # a model's predict can raise anything
        return GateOutcome(
            PREDICTS_ON_EXAMPLE, False, f"predict raised {type(exc).__name__}: {str(exc)[:300]}"
        )
    if len(predictions) != len(parsed.frame):
        return GateOutcome(
            PREDICTS_ON_EXAMPLE,
            False,
            f"{len(parsed.frame)} rows gave {len(predictions)} predictions",
        )
    return GateOutcome(
        PREDICTS_ON_EXAMPLE,
        True,
        f"{len(predictions)} rows scored",
        {"predictions": predictions[:10]},
    )


def _is_champion(name: str, candidate: ModelVersion, champion: ModelVersion) -> GateOutcome | None:
    if champion.pk != candidate.pk:
        return None
    return GateOutcome(
        name,
        False,
        f"v{candidate.version} is the live champion itself; there is nothing to compare or release",
        {"champion": champion.version},
    )


def _signature_compatible(candidate: ModelVersion, champion: ModelVersion | None) -> GateOutcome:
    if champion is None:
        return GateOutcome(SIGNATURE_COMPATIBLE, True, "no live champion to compare with")
    if (same := _is_champion(SIGNATURE_COMPATIBLE, candidate, champion)) is not None:
        return same
    if not candidate.signature:
        return GateOutcome(SIGNATURE_COMPATIBLE, False, "the candidate has no signature")
    diff = signature_diff(champion.signature, candidate.signature)
    breaking = [c for c in diff.changes if c.breaking]
    summary = (
        f"same inputs as v{champion.version}"
        if not diff.changes
        else f"{len(diff.changes)} change(s) from v{champion.version}, {len(breaking)} breaking"
    )
    return GateOutcome(
        SIGNATURE_COMPATIBLE,
        diff.compatible,
        summary,
        {"champion": champion.version, **diff.as_dict()},
    )


def _metrics_within_tolerance(
    candidate: ModelVersion, champion: ModelVersion | None, tolerance: float
) -> GateOutcome:
    if champion is None:
        return GateOutcome(METRICS_WITHIN_TOLERANCE, True, "no live champion to compare with")
    if (same := _is_champion(METRICS_WITHIN_TOLERANCE, candidate, champion)) is not None:
        return same
    rows = []
    failures = []
    for row in metric_rows(candidate.metrics, champion.metrics):
        gated = row.name in DEFAULT_GATED_METRICS and row.champion is not None
        ok = True
        if gated:
            ok = row.candidate is not None and row.candidate >= row.champion - tolerance
            if not ok:
                failures.append(row.name)
        rows.append(
            {
                "metric": row.name,
                "candidate": row.candidate,
                "champion": row.champion,
                "delta": row.delta,
                "gated": gated,
                "ok": ok,
            }
        )
    summary = (
        f"no gated metric dropped more than {tolerance:g} below v{champion.version}"
        if not failures
        else f"{', '.join(failures)} dropped more than {tolerance:g} below v{champion.version}"
    )
    return GateOutcome(
        METRICS_WITHIN_TOLERANCE,
        not failures,
        summary,
        {"champion": champion.version, "tolerance": tolerance, "metrics": rows},
    )


def _digest_stable(candidate: ModelVersion, digest_before: str) -> GateOutcome:
    try:
        digest_after = mlflow_client.artifact_digest(
            candidate.registered_model.name, candidate.version
        )
    except mlflow_client.RegistryError as exc:
        return GateOutcome(DIGEST_STABLE, False, str(exc)[:500])
    if digest_after != digest_before:
        return GateOutcome(
            DIGEST_STABLE,
            False,
            "the artifacts changed while the gates ran",
            {"before": digest_before, "after": digest_after},
        )
    return GateOutcome(
        DIGEST_STABLE, True, f"sha256:{digest_before[:16]}…", {"digest": digest_before}
    )

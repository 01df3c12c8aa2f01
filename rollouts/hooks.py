"""Interfaces that ``rollouts`` defines and higher apps implement.

``rollouts`` must not import ``monitoring`` (arrows point one way: ``monitoring -> rollouts ->
registry``). Where the serving data plane or a service needs something monitoring does, it calls
a hook here; ``monitoring`` registers its implementation in ``MonitoringConfig.ready()``, so every
process that loads the apps (web, serving, Celery) has it before it serves anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

#: Called with the prediction-log rows (``PredictionLog`` and ``ServingError`` instances, already
#: saved) after each write of the log, e.g. to mark their hours stale for the rollups.
PredictionLogged = Callable[[Sequence[Any]], object]

_prediction_logged: list[PredictionLogged] = []


def register_prediction_logged(callback: PredictionLogged) -> None:
    """Call ``callback(rows)`` after every prediction-log write. Registering the same callback
    again changes nothing (``ready()`` may run more than once in tests)."""
    if callback not in _prediction_logged:
        _prediction_logged.append(callback)


def unregister_prediction_logged(callback: PredictionLogged) -> None:
    """Forget ``callback``; no error when it was not registered."""
    if callback in _prediction_logged:
        _prediction_logged.remove(callback)


def prediction_logged_callbacks() -> tuple[PredictionLogged, ...]:
    return tuple(_prediction_logged)


def prediction_logged(rows: Sequence[Any]) -> None:
    """Run the registered callbacks on freshly written rows, in registration order. An error
    of a callback propagates to the log writer (which logs it and keeps the rows written)."""
    for callback in tuple(_prediction_logged):
        callback(rows)

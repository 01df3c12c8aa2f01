"""Rollout strategies: each a small planner that turns validated parameters into the steps a
rollout goes through (``rollouts.strategies.base.PlannedStep``). One executor advances any plan
one step at a time; the planners decide nothing at run time.

``plan(strategy, params, defaults)`` is the single entry point; ``STRATEGIES`` names them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rollouts.strategies import bluegreen, canary, direct
from rollouts.strategies.base import Plan, PlannedStep, params_check

STRATEGIES = {"direct": direct, "blue_green": bluegreen, "canary": canary}

__all__ = ["STRATEGIES", "Plan", "PlannedStep", "plan"]


def plan(
    strategy: str,
    params: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> Plan:
    """The plan of ``strategy`` for ``params`` (missing ones from ``defaults``, then the
    strategy's own). Raises django ValidationError naming each bad field: an unknown strategy
    or parameter, or a value out of range."""
    from django.core.exceptions import ValidationError

    module = STRATEGIES.get(strategy)
    if module is None:
        raise ValidationError(
            {"strategy": f"Unknown strategy {strategy!r}; one of {', '.join(STRATEGIES)}."}
        )
    values = params_check(module.PARAMS, params or {}, defaults or {})
    if validate := getattr(module, "validate", None):
        validate(values)
    return Plan(strategy=strategy, params=values, steps=tuple(module.steps(values)))

"""Direct: the new version takes all of the endpoint's traffic in one step."""

from __future__ import annotations

from rollouts.strategies.base import PlannedStep

PARAMS: dict = {}


def steps(params: dict) -> list[PlannedStep]:
    return [PlannedStep(index=0, weight=100, hold_s=0, analysed=False)]

"""Canary: the new version takes growing shares of the traffic (default 10 -> 25 -> 50 -> 100
percent), each share held for ``interval_s`` and judged by the canary analysis before the next;
the last step (100 %) is the promotion."""

from __future__ import annotations

from typing import Any

from rollouts.strategies.base import Param, PlannedStep, integer

DEFAULT_STEPS = (10, 25, 50, 100)


def weights(value: Any) -> tuple[int, ...]:
    """Strictly increasing whole percentages in 1..100, ending at 100."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError("must be a non-empty list of percentages, e.g. 10, 25, 50, 100")
    clean = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | str) or not str(item).isdigit():
            raise ValueError(f"must be whole percentages; {item!r} is not")
        clean.append(int(item))
    if any(not 1 <= w <= 100 for w in clean):
        raise ValueError("must each be between 1 and 100")
    if any(b <= a for a, b in zip(clean, clean[1:], strict=False)):
        raise ValueError("must increase from one step to the next")
    if clean[-1] != 100:
        raise ValueError("must end at 100 (the promotion)")
    if len(clean) > 20:
        raise ValueError("must be 20 steps or fewer")
    return tuple(clean)


PARAMS = {
    "steps": Param(DEFAULT_STEPS, weights, "percent of traffic at each step, ending at 100"),
    "interval_s": Param(300, integer(5, 86_400, "seconds"), "how long each step is analysed"),
    "max_extensions": Param(
        3, integer(0, 20, "extensions"), "intervals added to a step short of data, then pause"
    ),
}


def steps(params: dict) -> list[PlannedStep]:
    return [
        PlannedStep(
            index=i, weight=w, hold_s=params["interval_s"] if w < 100 else 0, analysed=w < 100
        )
        for i, w in enumerate(params["steps"])
    ]

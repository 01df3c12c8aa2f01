"""What a planner returns, and the checking of its parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from django.core.exceptions import ValidationError


@dataclass(frozen=True)
class PlannedStep:
    """One step: ``weight`` percent of the endpoint's traffic to the new version (0 for a
    preview beside the old one), held ``hold_s`` seconds; ``analysed`` steps end with a canary
    analysis verdict, the others when their hold is over. ``kind`` names what the step does:
    ``traffic`` (set the weight), ``preview`` (load beside stable, no traffic), ``bake`` (hold
    at 100 % with the old version still loaded)."""

    index: int
    weight: int
    hold_s: int
    analysed: bool
    kind: str = "traffic"


@dataclass(frozen=True)
class Plan:
    strategy: str
    params: dict[str, Any]
    steps: tuple[PlannedStep, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "params": self.params,
            "steps": [asdict(s) for s in self.steps],
        }


@dataclass(frozen=True)
class Param:
    """A parameter: its default and a checker that returns the clean value or raises
    ValueError with the message shown to the user."""

    default: Any
    check: Callable[[Any], Any]
    help: str


def integer(low: int, high: int, unit: str) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"must be a whole number of {unit}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"must be a whole number of {unit}") from None
        if not low <= number <= high:
            raise ValueError(f"must be between {low} and {high} {unit}")
        return number

    return check


def boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value in ("true", "on", "1", 1):
        return True
    if value in ("false", "off", "0", 0, ""):
        return False
    raise ValueError("must be true or false")


def params_check(
    spec: Mapping[str, Param], params: Mapping[str, Any], defaults: Mapping[str, Any]
) -> dict[str, Any]:
    """Each parameter of ``spec`` from ``params``, else ``defaults``, else its own default,
    checked. Raises ValidationError naming every unknown or bad parameter at once."""
    if not isinstance(params, Mapping):
        raise ValidationError({"params": "must be an object of strategy parameters"})
    errors: dict[str, str] = {}
    for name in sorted(set(params) - set(spec)):
        errors[name] = f"is not a parameter of this strategy (known: {', '.join(spec) or 'none'})"
    values: dict[str, Any] = {}
    for name, param in spec.items():
        raw = params.get(name, defaults.get(name, param.default))
        try:
            values[name] = param.check(raw)
        except ValueError as exc:
            errors[name] = f"{name} {exc}"
    if errors:
        raise ValidationError(errors)
    return values

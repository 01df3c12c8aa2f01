"""Compare two model versions: signature diff and metric/param deltas (pure functions on the
mirrored fields, no MLflow calls)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Types a serving client may keep sending when a column's type changes from key to value:
# widening conversions that MLflow's schema enforcement performs without loss.
COMPATIBLE_TYPES: dict[str, frozenset[str]] = {
    "integer": frozenset({"integer", "long", "float", "double"}),
    "long": frozenset({"long", "double"}),
    "float": frozenset({"float", "double"}),
    "double": frozenset({"double"}),
    "boolean": frozenset({"boolean"}),
    "string": frozenset({"string"}),
    "binary": frozenset({"binary"}),
    "datetime": frozenset({"datetime"}),
}


@dataclass(frozen=True)
class ColumnChange:
    name: str
    change: str  # "added", "removed", "type", "required"
    old: str | None
    new: str | None
    breaking: bool


@dataclass(frozen=True)
class SignatureDiff:
    changes: list[ColumnChange] = field(default_factory=list)
    outputs_changed: bool = False

    @property
    def compatible(self) -> bool:
        """True when every client of ``old`` can call ``new`` unchanged."""
        return not any(c.breaking for c in self.changes)

    def as_dict(self) -> dict[str, Any]:
        return {
            "compatible": self.compatible,
            "outputs_changed": self.outputs_changed,
            "changes": [c.__dict__ for c in self.changes],
        }


def _columns(signature: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    return {
        col.get("name", f"#{i}"): col for i, col in enumerate((signature or {}).get("inputs") or [])
    }


def signature_diff(old: dict[str, Any] | None, new: dict[str, Any] | None) -> SignatureDiff:
    """How the input columns of ``new`` differ from ``old`` (the live champion's).

    Breaking: a column ``new`` requires that ``old`` did not have or did not require; a removed
    column (Rollgate's serving rejects unknown columns, so clients that still send it would get
    400); a type clients cannot keep sending (see ``COMPATIBLE_TYPES``). Not breaking: a new
    optional column, a widening type change.
    """
    before, after = _columns(old), _columns(new)
    changes: list[ColumnChange] = []
    for name in sorted(after.keys() - before.keys()):
        required = after[name].get("required", True)
        changes.append(
            ColumnChange(name, "added", None, after[name].get("type"), breaking=required)
        )
    for name in sorted(before.keys() - after.keys()):
        changes.append(ColumnChange(name, "removed", before[name].get("type"), None, breaking=True))
    for name in sorted(before.keys() & after.keys()):
        old_type, new_type = before[name].get("type"), after[name].get("type")
        if old_type != new_type:
            ok = new_type in COMPATIBLE_TYPES.get(old_type or "", frozenset({old_type}))
            changes.append(ColumnChange(name, "type", old_type, new_type, breaking=not ok))
        was_required, is_required = (
            before[name].get("required", True),
            after[name].get("required", True),
        )
        if is_required and not was_required:
            changes.append(ColumnChange(name, "required", "optional", "required", breaking=True))
    outputs_changed = (old or {}).get("outputs") != (new or {}).get("outputs")
    return SignatureDiff(changes, outputs_changed)


@dataclass(frozen=True)
class MetricRow:
    name: str
    candidate: float | None
    champion: float | None

    @property
    def delta(self) -> float | None:
        if self.candidate is None or self.champion is None:
            return None
        return self.candidate - self.champion


def metric_rows(candidate: dict[str, float], champion: dict[str, float] | None) -> list[MetricRow]:
    """One row per metric of either version, sorted by name."""
    champion = champion or {}
    return [
        MetricRow(name, candidate.get(name), champion.get(name))
        for name in sorted(set(candidate) | set(champion))
    ]


def param_rows(
    a: dict[str, str], b: dict[str, str]
) -> list[tuple[str, str | None, str | None, bool]]:
    """(name, a's value, b's value, differs) for every param of either version."""
    return [(k, a.get(k), b.get(k), a.get(k) != b.get(k)) for k in sorted(set(a) | set(b))]

"""Blue-green: the new version (green) is loaded and smoke-tested beside the old one (blue) and
can be called at the endpoint's preview URL; optionally analysed on those preview calls; then
all traffic switches in one change; the old version stays loaded for ``keep_old_s`` so that a
rollback is instant, and an optional post-promotion window is analysed, switching back on a
failing verdict."""

from __future__ import annotations

from rollouts.strategies.base import Param, PlannedStep, boolean, integer

PARAMS = {
    "preview_s": Param(
        0, integer(0, 86_400, "seconds"), "how long green is previewed before the switch"
    ),
    "preview_analysis": Param(False, boolean, "judge the preview calls before the switch"),
    "post_promotion_s": Param(
        0, integer(0, 86_400, "seconds"), "analysis window after the switch; 0: none"
    ),
    "keep_old_s": Param(600, integer(0, 86_400, "seconds"), "how long blue stays loaded"),
}


def validate(params: dict) -> None:
    """A preview analysis needs a preview window to judge."""
    if params["preview_analysis"] and not params["preview_s"]:
        from django.core.exceptions import ValidationError

        raise ValidationError({"preview_s": "preview_s must be set to analyse the preview calls"})


def steps(params: dict) -> list[PlannedStep]:
    plan = []
    if params["preview_s"] or params["preview_analysis"]:
        plan.append(
            PlannedStep(0, 0, params["preview_s"], params["preview_analysis"], kind="preview")
        )
    plan.append(PlannedStep(len(plan), 100, 0, False))
    if params["post_promotion_s"]:
        plan.append(PlannedStep(len(plan), 100, params["post_promotion_s"], True, kind="bake"))
    return plan

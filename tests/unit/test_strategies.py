"""The strategy planners (``rollouts.strategies``): the steps each plans, and every bad
parameter refused with its name before anything changes (issue 10, point 7)."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from rollouts.strategies import STRATEGIES, plan


def _weights(p):
    return [s.weight for s in p.steps]


def test_direct_is_one_step_to_100():
    p = plan("direct")
    assert _weights(p) == [100] and not p.steps[0].analysed


def test_canary_defaults_and_analysed_steps():
    p = plan("canary")
    assert _weights(p) == [10, 25, 50, 100]
    assert [s.analysed for s in p.steps] == [True, True, True, False]
    assert [s.hold_s for s in p.steps] == [300, 300, 300, 0]


def test_canary_takes_defaults_from_the_policy_then_params():
    p = plan("canary", {"interval_s": 30}, defaults={"interval_s": 60, "steps": [20, 100]})
    assert _weights(p) == [20, 100] and p.steps[0].hold_s == 30
    assert plan("canary", {"steps": "5, 50, 100"}).params["steps"] == (5, 50, 100)


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"steps": [50, 25, 100]}, "steps", "increase"),
        ({"steps": [10, 10, 100]}, "steps", "increase"),
        ({"steps": [0, 100]}, "steps", "between 1 and 100"),
        ({"steps": [10, 101]}, "steps", "between 1 and 100"),
        ({"steps": []}, "steps", "non-empty"),
        ({"steps": "none"}, "steps", "whole percentages"),
        ({"steps": [10, 50]}, "steps", "end at 100"),
        ({"steps": [10.5, 100]}, "steps", "whole percentages"),
        ({"steps": list(range(1, 101))}, "steps", "20 steps or fewer"),
        ({"interval_s": 1}, "interval_s", "between 5 and 86400"),
        ({"interval_s": 10**30}, "interval_s", "between 5 and 86400"),
        ({"interval_s": "soon"}, "interval_s", "whole number"),
        ({"interval_s": True}, "interval_s", "whole number"),
        ({"max_extensions": -1}, "max_extensions", "between 0 and 20"),
        ({"surprise": 1}, "surprise", "not a parameter"),
    ],
)
def test_bad_canary_parameters_are_refused_by_name(params, field, message):
    with pytest.raises(ValidationError) as caught:
        plan("canary", params)
    assert field in caught.value.message_dict
    assert message in " ".join(caught.value.message_dict[field])


def test_blue_green_plans_preview_switch_and_bake():
    assert _weights(plan("blue_green")) == [100]
    p = plan("blue_green", {"preview_s": 60, "preview_analysis": True, "post_promotion_s": 120})
    assert [(s.kind, s.weight, s.hold_s, s.analysed) for s in p.steps] == [
        ("preview", 0, 60, True),
        ("traffic", 100, 0, False),
        ("bake", 100, 120, True),
    ]
    assert p.params["keep_old_s"] == 600


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"preview_analysis": True}, "preview_s"),
        ({"keep_old_s": -5}, "keep_old_s"),
        ({"preview_analysis": "maybe"}, "preview_analysis"),
        ({"post_promotion_s": 86_401}, "post_promotion_s"),
    ],
)
def test_bad_blue_green_parameters_are_refused_by_name(params, field):
    with pytest.raises(ValidationError) as caught:
        plan("blue_green", params)
    assert field in caught.value.message_dict


def test_unknown_strategies_and_non_object_params_are_refused():
    with pytest.raises(ValidationError) as caught:
        plan("big_bang")
    assert "strategy" in caught.value.message_dict
    with pytest.raises(ValidationError) as caught:
        plan("canary", ["steps"])
    assert "params" in caught.value.message_dict
    with pytest.raises(ValidationError):
        plan("direct", {"steps": [100]})
    assert set(STRATEGIES) == {"direct", "blue_green", "canary"}

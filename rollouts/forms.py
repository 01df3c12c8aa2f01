from __future__ import annotations

from django import forms

from rollouts.models import Endpoint, Environment, Strategy


class DeploymentRequestForm(forms.Form):
    environment = forms.ModelChoiceField(queryset=Environment.objects.all(), empty_label=None)
    strategy = forms.ChoiceField(choices=Strategy.choices, initial=Strategy.DIRECT)
    canary_steps = forms.CharField(
        required=False,
        max_length=200,
        label="Canary steps",
        help_text="canary only: percent of traffic at each step, e.g. 10, 25, 50, 100; "
        "empty: the environment's default",
    )
    canary_interval_s = forms.IntegerField(
        required=False,
        min_value=5,
        max_value=86_400,
        label="Analysis interval (s)",
        help_text="canary only: how long each step is judged; empty: the environment's default",
    )

    def strategy_params(self) -> dict:
        """The canary parameters given (the rest come from the environment's defaults)."""
        if self.cleaned_data.get("strategy") != Strategy.CANARY:
            return {}
        params = {}
        if steps := self.cleaned_data.get("canary_steps"):
            params["steps"] = steps
        if (interval := self.cleaned_data.get("canary_interval_s")) is not None:
            params["interval_s"] = interval
        return params

    justification = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        max_length=4000,
        help_text="Why this version should be deployed: what changed, what was checked.",
    )


class ReviewForm(forms.Form):
    comment = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 2}), required=False, max_length=4000
    )


class ApiKeyForm(forms.Form):
    """A new API key: its client's name, the endpoints it may call, an optional rate limit."""

    name = forms.CharField(max_length=100, help_text="the client application that will use it")
    endpoints = forms.ModelMultipleChoiceField(
        queryset=Endpoint.objects.select_related("environment"),
        widget=forms.CheckboxSelectMultiple,
    )
    rate_limit_per_minute = forms.IntegerField(
        required=False,
        min_value=1,
        max_value=1_000_000,
        help_text="scoring requests per minute; empty: unlimited",
    )

from __future__ import annotations

from django import forms

from rollouts.models import Endpoint, Environment, Strategy


class DeploymentRequestForm(forms.Form):
    environment = forms.ModelChoiceField(queryset=Environment.objects.all(), empty_label=None)
    strategy = forms.ChoiceField(choices=Strategy.choices, initial=Strategy.DIRECT)
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

from __future__ import annotations

from django import forms

from rollouts.models import Environment, Strategy


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

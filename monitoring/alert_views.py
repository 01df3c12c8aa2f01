"""Alert pages: the list of open and recent alerts, one alert's evidence, acknowledgement, and
rule management for platform admins. Writes go through :mod:`monitoring.alerts`."""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from monitoring import alerts
from monitoring.models import Alert, AlertRule
from portal.errors import Conflict
from rollouts.selectors import endpoints_visible_to

#: Resolved alerts stay on the list this long.
RECENT = timedelta(days=7)
STATUS_FILTERS = ("active", *Alert.Status.values, "all")


class AlertRuleForm(forms.ModelForm):
    """Parses a rule's fields; :func:`monitoring.alerts.alert_rule_validate` (called by the
    services) decides whether they make sense together."""

    class Meta:
        model = AlertRule
        fields = ["endpoint", *AlertRule.EDITABLE]
        widgets = {"threshold": forms.NumberInput(attrs={"step": "any"})}

    def __init__(self, *args, user, editing: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["endpoint"].queryset = endpoints_visible_to(user)
        if editing:
            self.fields["endpoint"].disabled = True


def _visible_alert(request: HttpRequest, alert_id: int) -> Alert:
    try:
        return alerts.alerts_visible_to(request.user).get(pk=alert_id)
    except Alert.DoesNotExist:
        raise Http404(f"No alert #{alert_id}.") from None


@login_required
def alert_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "active")
    if status not in STATUS_FILTERS:
        return HttpResponseBadRequest(f"status must be one of {', '.join(STATUS_FILTERS)}.")
    qs = alerts.alerts_visible_to(request.user)
    endpoint = None
    if name := request.GET.get("endpoint", "").strip():
        endpoint = get_object_or_404(endpoints_visible_to(request.user), name=name)
        qs = qs.filter(endpoint=endpoint)
    active = list(qs.filter(status__in=alerts.ACTIVE)[:200])
    if status == "active":
        shown = qs.filter(status=Alert.Status.RESOLVED, resolved_at__gte=timezone.now() - RECENT)
    elif status == "all":
        shown = qs.exclude(status__in=alerts.ACTIVE)
    else:
        shown = qs.filter(status=status)
    rules = alerts.alert_rules_visible_to(request.user)
    if endpoint is not None:
        rules = rules.filter(endpoint=endpoint)
    return render(
        request,
        "monitoring/alerts.html",
        {
            "active": active if status in ("active", "all") else [],
            "shown": list(shown[:200]),
            "status": status,
            "statuses": STATUS_FILTERS,
            "endpoint": endpoint,
            "rules": list(rules),
            "can_acknowledge": alerts.can_acknowledge_alerts(request.user),
            "can_manage_rules": alerts.can_manage_alert_rules(request.user),
        },
    )


def _detail(request: HttpRequest, alert: Alert, *, error: str = "", status: int = 200):
    return render(
        request,
        "monitoring/alerts_detail.html",
        {
            "alert": alert,
            "retraining_requests": list(alert.retraining_requests.all()),
            "can_acknowledge": alerts.can_acknowledge_alerts(request.user)
            and alert.status == Alert.Status.OPEN,
            "error": error,
        },
        status=status,
    )


@login_required
def alert_detail(request: HttpRequest, alert_id: int) -> HttpResponse:
    return _detail(request, _visible_alert(request, alert_id))


@login_required
@require_POST
def alert_acknowledge(request: HttpRequest, alert_id: int) -> HttpResponse:
    alert = _visible_alert(request, alert_id)
    try:
        alerts.alert_acknowledge(alert_id=alert.pk, actor=request.user)
    except Conflict as exc:
        return _detail(request, _visible_alert(request, alert_id), error=str(exc), status=409)
    messages.success(request, f"Alert #{alert.pk} acknowledged.")
    return redirect(alert)


def _rule_form_page(request: HttpRequest, rule: AlertRule | None) -> HttpResponse:
    if not alerts.can_manage_alert_rules(request.user):
        raise PermissionDenied("Only platform admins can configure alert rules.")
    form = AlertRuleForm(
        request.POST or None,
        instance=AlertRule.objects.get(pk=rule.pk) if rule else None,
        user=request.user,
        editing=rule is not None,
    )
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            fields = {name: form.cleaned_data[name] for name in AlertRule.EDITABLE}
            try:
                if rule is None:
                    saved = alerts.alert_rule_create(
                        actor=request.user, endpoint=form.cleaned_data["endpoint"], **fields
                    )
                else:
                    saved = alerts.alert_rule_update(
                        rule_id=rule.pk, actor=request.user, changes=fields
                    )
            except ValidationError as exc:
                for name, errors in exc.message_dict.items():
                    form.add_error(name if name in form.fields else None, errors)
            else:
                messages.success(request, f"Alert rule “{saved.label}” saved.")
                return redirect(f"{_alerts_url()}?endpoint={saved.endpoint.name}")
    return render(
        request, "monitoring/alerts_rule_form.html", {"form": form, "rule": rule}, status=status
    )


def _alerts_url() -> str:
    from django.urls import reverse

    return reverse("monitoring:alerts")


@login_required
def rule_create(request: HttpRequest) -> HttpResponse:
    return _rule_form_page(request, None)


@login_required
def rule_edit(request: HttpRequest, rule_id: int) -> HttpResponse:
    rule = get_object_or_404(alerts.alert_rules_visible_to(request.user), pk=rule_id)
    return _rule_form_page(request, rule)


@login_required
@require_POST
def rule_set_enabled(request: HttpRequest, rule_id: int) -> HttpResponse:
    rule = get_object_or_404(alerts.alert_rules_visible_to(request.user), pk=rule_id)
    value = request.POST.get("enabled", "")
    if value not in ("0", "1"):
        return HttpResponseBadRequest("enabled must be 0 or 1.")
    alerts.alert_rule_update(rule_id=rule.pk, actor=request.user, changes={"enabled": value == "1"})
    messages.success(
        request, f"Alert rule “{rule.label}” {'enabled' if value == '1' else 'disabled'}."
    )
    return redirect(f"{_alerts_url()}?endpoint={rule.endpoint.name}")

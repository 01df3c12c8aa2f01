"""Admin for alert rules (saved through the audited services), alerts and retraining requests
(read-only here: alerts are acknowledged on the portal's alert page), and drift thresholds."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied, ValidationError

from monitoring import alerts, drift
from monitoring.models import Alert, AlertRule, DriftSettings, RetrainingRequest
from portal.admin_audit import AuditedModelAdmin
from portal.errors import Conflict


@admin.register(AlertRule)
class AlertRuleAdmin(AuditedModelAdmin):
    audited_by_services = True
    list_display = [
        "__str__",
        "kind",
        "threshold",
        "window_hours",
        "min_samples",
        "action",
        "enabled",
    ]
    list_filter = ["kind", "action", "enabled"]
    fields = ["endpoint", *AlertRule.EDITABLE]

    def get_readonly_fields(self, request, obj=None):
        return ["endpoint"] if obj else []

    def get_form(self, request, obj=None, **kwargs):
        form = super().get_form(request, obj, **kwargs)
        # Whole-rule validation happens in the form, so that the admin shows field errors
        # instead of saving half of a bad rule.
        base_clean = form.clean

        def clean(self):
            data = base_clean(self)
            candidate = AlertRule(
                endpoint_id=(obj.endpoint_id if obj else getattr(data.get("endpoint"), "pk", None)),
                **{f: data.get(f, getattr(self.instance, f)) for f in AlertRule.EDITABLE},
            )
            try:
                alerts.alert_rule_validate(candidate)
            except ValidationError as exc:
                for name, errors in exc.message_dict.items():
                    self.add_error(name if name in self.fields else None, errors)
            return data

        form.clean = clean
        return form

    def save_model(self, request, obj, form, change):
        fields = {f: form.cleaned_data[f] for f in AlertRule.EDITABLE if f in form.cleaned_data}
        if change:
            saved = alerts.alert_rule_update(rule_id=obj.pk, actor=request.user, changes=fields)
        else:
            saved = alerts.alert_rule_create(
                actor=request.user, endpoint=form.cleaned_data["endpoint"], **fields
            )
        obj.pk = saved.pk

    def has_module_permission(self, request):
        return alerts.can_manage_alert_rules(request.user)


@admin.register(Alert)
class AlertAdmin(AuditedModelAdmin):
    list_display = [
        "pk",
        "fired_at",
        "endpoint",
        "model_version",
        "message",
        "status",
        "action_status",
    ]
    list_filter = ["status", "action", "action_status"]
    search_fields = ["message"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(RetrainingRequest)
class RetrainingRequestAdmin(AuditedModelAdmin):
    list_display = ["pk", "created_at", "endpoint", "model_version", "status", "created_by"]
    list_filter = ["status"]
    actions = ["close"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.action(description="Close the selected retraining requests")
    def close(self, request, queryset):
        for retraining in queryset:
            try:
                alerts.retraining_request_close(request_id=retraining.pk, actor=request.user)
            except (Conflict, PermissionDenied) as exc:
                messages.error(request, str(exc))


THRESHOLD_FIELDS = ("psi_warning", "psi_drift", "wasserstein", "jensen_shannon", "missing_change")


class DriftSettingsForm(forms.ModelForm):
    class Meta:
        model = DriftSettings
        fields = ["endpoint", *THRESHOLD_FIELDS, "drift_share", "feature_thresholds"]

    def clean(self):
        data = super().clean()
        limits = {name: data.get(name) for name in THRESHOLD_FIELDS}
        try:
            base = drift.Thresholds(**limits)
            for name, overrides in (data.get("feature_thresholds") or {}).items():
                if not isinstance(overrides, dict) or set(overrides) - set(THRESHOLD_FIELDS):
                    raise ValueError(
                        f"feature_thresholds[{name!r}] must map some of "
                        f"{', '.join(THRESHOLD_FIELDS)} to numbers"
                    )
                drift.Thresholds(**{**base.__dict__, **overrides})
        except (TypeError, ValueError) as exc:
            raise forms.ValidationError(str(exc)) from exc
        share = data.get("drift_share")
        if share is not None and not 0 < share <= 1:
            self.add_error("drift_share", "The drifted share must be in (0, 1].")
        return data


@admin.register(DriftSettings)
class DriftSettingsAdmin(AuditedModelAdmin):
    """Drift thresholds per endpoint. Saving one is audited and has every window of the
    endpoint compared again under the new limits."""

    form = DriftSettingsForm
    audited_by_services = True
    list_display = ["endpoint", "psi_warning", "psi_drift", "wasserstein", "jensen_shannon"]

    def save_model(self, request, obj, form, change):
        from monitoring.services import drift_settings_saved

        super().save_model(request, obj, form, change)
        drift_settings_saved(actor=request.user, settings_row=obj, changed=form.changed_data)

    def after_write(self, obj):
        """A deleted row puts the endpoint back on the default limits: compare again."""
        from monitoring.services import endpoint_windows_mark_stale

        endpoint_windows_mark_stale(obj.endpoint_id)

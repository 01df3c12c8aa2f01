from __future__ import annotations

from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from portal.audit import audit_record
from rollouts import services
from rollouts.models import (
    ApiKey,
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    FreezeWindow,
)


@admin.register(Environment)
class EnvironmentAdmin(admin.ModelAdmin):
    """Platform admins edit approval policies here; a change is saved (and audited) by
    ``services.environment_policy_update``."""

    list_display = [
        "name",
        "order",
        "required_approvals",
        "approver_group",
        "requires_live_in",
        "metric_tolerance",
        "request_expiry_days",
    ]
    fields = ["name", "description", "order", *Environment.POLICY_FIELDS]

    def get_readonly_fields(self, request, obj=None):
        return ["name"] if obj else []

    def save_model(self, request, obj, form, change):
        if not change:
            super().save_model(request, obj, form, change)
            audit_record(
                actor=request.user,
                action="environment.created",
                obj=obj,
                environment=obj.name,
                after=obj.policy(),
            )
            return
        policy_changes = {
            f: form.cleaned_data[f] for f in Environment.POLICY_FIELDS if f in form.changed_data
        }
        Environment.objects.filter(pk=obj.pk).update(description=obj.description, order=obj.order)
        if policy_changes:
            try:
                services.environment_policy_update(
                    environment_id=obj.pk, actor=request.user, changes=policy_changes
                )
            except ValidationError as exc:
                messages.error(request, " ".join(exc.messages))


@admin.register(FreezeWindow)
class FreezeWindowAdmin(admin.ModelAdmin):
    list_display = ["environment", "starts_at", "ends_at", "reason"]
    list_filter = ["environment"]

    def has_change_permission(self, request, obj=None):
        return False  # windows are scheduled, not edited: the audit trail keeps each one

    def save_model(self, request, obj, form, change):
        window = services.freeze_window_create(
            environment=obj.environment,
            actor=request.user,
            starts_at=obj.starts_at,
            ends_at=obj.ends_at,
            reason=obj.reason,
        )
        obj.pk = window.pk


@admin.register(Endpoint)
class EndpointAdmin(admin.ModelAdmin):
    list_display = ["name", "environment", "registered_model", "created_at"]
    list_filter = ["environment"]


@admin.register(DeploymentRequest)
class DeploymentRequestAdmin(admin.ModelAdmin):
    """Read-only: requests change state only through the services (the portal's pages/API)."""

    list_display = ["pk", "model_version", "endpoint", "requester", "status", "created_at"]
    list_filter = ["status", "endpoint__environment"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Deployment)
class DeploymentAdmin(DeploymentRequestAdmin):
    list_display = ["pk", "model_version", "endpoint", "status", "traffic_weight", "live_at"]
    list_filter = ["status", "endpoint"]


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ["name", "prefix", "created_by", "created_at", "revoked_at"]
    readonly_fields = ["prefix", "key_hash", "created_by", "created_at", "revoked_at"]
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False  # keys are created by the seed or `manage.py create_api_key`, shown once

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            services.api_key_revoke(key_id=key.pk, actor=request.user)
        messages.success(request, f"Revoked {queryset.count()} key(s).")

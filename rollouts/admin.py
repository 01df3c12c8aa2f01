from __future__ import annotations

from django.contrib import admin, messages

from rollouts import services
from rollouts.models import ApiKey, Deployment, DeploymentRequest, Endpoint, Environment


@admin.register(Environment)
class EnvironmentAdmin(admin.ModelAdmin):
    list_display = ["name", "order", "description"]


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

from __future__ import annotations

from django.contrib import admin

from registry.models import ModelVersion, RegisteredModel


class ReadOnlyMirrorAdmin(admin.ModelAdmin):
    """The mirror is written by sync only; MLflow is the source of truth."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(RegisteredModel)
class RegisteredModelAdmin(ReadOnlyMirrorAdmin):
    list_display = ["name", "aliases", "synced_at"]
    search_fields = ["name"]


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyMirrorAdmin):
    list_display = ["registered_model", "version", "status", "run_id", "synced_at"]
    list_filter = ["registered_model"]

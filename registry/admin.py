from __future__ import annotations

from django.contrib import admin

from portal.admin_audit import AuditedModelAdmin
from portal.audit import audit_record
from registry.models import ModelVersion, RegisteredModel


class ReadOnlyMirrorAdmin(AuditedModelAdmin):
    """The mirror is written by sync only; MLflow is the source of truth."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(RegisteredModel)
class RegisteredModelAdmin(ReadOnlyMirrorAdmin):
    """Read-only but for the owning team, which platform admins assign (audited as
    ``registry.team_assigned``)."""

    audited_by_services = True

    list_display = ["name", "team", "aliases", "synced_at"]
    list_filter = ["team"]
    search_fields = ["name"]
    fields = ["name", "team", "description", "aliases", "synced_at"]
    readonly_fields = ["name", "description", "aliases", "synced_at"]

    def has_change_permission(self, request, obj=None):
        return (
            request.user.is_superuser or request.user.groups.filter(name="platform admins").exists()
        )

    def save_model(self, request, obj, form, change):
        if "team" in form.changed_data:
            before = RegisteredModel.objects.get(pk=obj.pk).team
            super().save_model(request, obj, form, change)
            audit_record(
                actor=request.user,
                action="registry.team_assigned",
                obj=obj,
                registered_model=obj.name,
                before={"team": str(before) if before else None},
                after={"team": str(obj.team) if obj.team else None},
            )


@admin.register(ModelVersion)
class ModelVersionAdmin(ReadOnlyMirrorAdmin):
    list_display = ["registered_model", "version", "status", "run_id", "synced_at"]
    list_filter = ["registered_model"]

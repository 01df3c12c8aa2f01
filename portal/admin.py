from __future__ import annotations

from django.contrib import admin

from portal.admin_audit import AuditedModelAdmin
from portal.models import AuditEvent, Team


@admin.register(AuditEvent)
class AuditEventAdmin(AuditedModelAdmin):
    list_display = ["pk", "created_at", "actor_label", "action", "object_repr"]
    list_filter = ["action"]
    search_fields = ["object_repr", "actor_label"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Team)
class TeamAdmin(AuditedModelAdmin):
    list_display = ["name", "slug"]
    prepopulated_fields = {"slug": ["name"]}
    filter_horizontal = ["members"]


# --- security (issue 9): API tokens -----------------------------------------------------------
# knox's own admin lets an admin create a token for any user (and so act as them); ours only
# lists tokens (digest prefix, owner, expiry) and revokes them through the audited service.
from knox.models import AuthToken  # noqa: E402

from portal import tokens as _tokens  # noqa: E402

if admin.site.is_registered(AuthToken):
    admin.site.unregister(AuthToken)


@admin.register(AuthToken)
class AuthTokenAdmin(AuditedModelAdmin):
    audited_by_services = True
    list_display = ("token_key", "user", "created", "expiry")
    search_fields = ("token_key", "user__username")
    fields = ("token_key", "user", "created", "expiry")
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def delete_model(self, request, obj):
        _tokens.api_token_revoke(token=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for token in queryset.select_related("user"):
            _tokens.api_token_revoke(token=token, actor=request.user)


# --- users: sign-in times are recorded by Django, not edited ------------------------------------
# (The change form posts them to the second, so saving a user would otherwise trim them and
# the audit would show a change nobody made.)
from django.contrib.auth.admin import UserAdmin  # noqa: E402
from django.contrib.auth.models import User  # noqa: E402

if admin.site.is_registered(User):
    admin.site.unregister(User)


@admin.register(User)
class PortalUserAdmin(AuditedModelAdmin, UserAdmin):
    readonly_fields = ("last_login", "date_joined")

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError

from portal.admin_audit import AuditedModelAdmin
from rollouts import services
from rollouts.models import (
    ApiKey,
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    FreezeWindow,
    Rollout,
    RolloutStep,
    TrafficHistory,
)


class EnvironmentForm(forms.ModelForm):
    """Validates the environment whole (``services.environment_policy_validate``) before the
    admin saves anything, so that a bad policy is a field error and nothing of it is saved."""

    class Meta:
        model = Environment
        fields = ["name", "description", "order", *Environment.POLICY_FIELDS]

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        candidate = Environment(
            pk=self.instance.pk,
            name=data.get("name", self.instance.name),
            **{f: data.get(f) for f in ("description", "order", *Environment.POLICY_FIELDS)},
        )
        changed = None if self.instance.pk is None else set(self.changed_data)
        try:
            services.environment_policy_validate(candidate, changed=changed)
        except ValidationError as exc:
            for name, errors in exc.message_dict.items():
                self.add_error(name if name in self.fields else None, errors)
        return data


@admin.register(Environment)
class EnvironmentAdmin(AuditedModelAdmin):
    """Platform admins edit approval policies here; a change is validated whole and saved (and
    audited) by ``services.environment_create`` / ``services.environment_policy_update``."""

    form = EnvironmentForm
    audited_by_services = True
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

    def has_delete_permission(self, request, obj=None):
        return False  # endpoints and the promotion path refer to it; the audit names it

    def save_model(self, request, obj, form, change):
        editable = ("description", "order", *Environment.POLICY_FIELDS)
        if not change:
            saved = services.environment_create(
                actor=request.user,
                fields={"name": form.cleaned_data["name"]}
                | {f: form.cleaned_data[f] for f in editable},
            )
            obj.pk = saved.pk
            return
        services.environment_policy_update(
            environment_id=obj.pk,
            actor=request.user,
            changes={f: form.cleaned_data[f] for f in editable if f in form.changed_data},
        )

    def save_related(self, request, form, formsets, change):
        pass  # no relations of its own beyond the policy's foreign keys, saved above

    def change_view(self, request, object_id, form_url="", extra_context=None):
        env = Environment.objects.filter(pk=object_id).first() if object_id.isdigit() else None
        if env is not None and request.method == "GET":
            from rollouts.selectors import approval_policy_problem

            if problem := approval_policy_problem(env):
                messages.warning(request, problem)
        return super().change_view(request, object_id, form_url, extra_context)


@admin.register(FreezeWindow)
class FreezeWindowAdmin(AuditedModelAdmin):
    audited_by_services = True
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
class EndpointAdmin(AuditedModelAdmin):
    """An endpoint is made by the first request for its model in its environment; its name is
    its URL (clients call it), so only its body limit is edited here (audited, and routing
    reloads it)."""

    list_display = ["name", "environment", "registered_model", "max_body_bytes", "created_at"]
    list_filter = ["environment"]
    fields = ["name", "environment", "registered_model", "max_body_bytes", "created_at"]
    readonly_fields = ["name", "environment", "registered_model", "created_at"]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # deployments, predictions and the audit refer to it

    def after_write(self, obj):
        from rollouts.serving.runtime import router

        router.invalidate()


@admin.register(DeploymentRequest)
class DeploymentRequestAdmin(AuditedModelAdmin):
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
    list_display = [
        "pk",
        "model_version",
        "endpoint",
        "status",
        "role",
        "traffic_weight",
        "live_at",
    ]
    list_filter = ["status", "role", "endpoint"]


@admin.register(Rollout)
class RolloutAdmin(DeploymentRequestAdmin):
    """Read-only: rollouts move only through the services (approval, the deploy task)."""

    list_display = ["pk", "request", "strategy", "state", "started_at", "ended_at"]
    list_filter = ["state", "strategy"]


@admin.register(RolloutStep)
class RolloutStepAdmin(DeploymentRequestAdmin):
    """Read-only, as its rollout."""

    list_display = ["pk", "rollout", "index", "planned_weight", "verdict", "started_at", "ended_at"]
    list_filter = ["verdict"]


@admin.register(TrafficHistory)
class TrafficHistoryAdmin(DeploymentRequestAdmin):
    """Read-only: written only by ``services.traffic_set``."""

    list_display = ["pk", "endpoint", "split", "reason", "actor_label", "created_at"]
    list_filter = ["endpoint"]


class ApiKeyForm(forms.ModelForm):
    class Meta:
        model = ApiKey
        fields = ["name", "endpoints", "rate_limit_per_minute"]

    def clean(self):
        data = super().clean()
        if not self.errors:
            try:
                services.api_key_validate(
                    data["name"], list(data["endpoints"]), data.get("rate_limit_per_minute")
                )
            except ValidationError as exc:
                for name, errors in exc.message_dict.items():
                    self.add_error(name if name in self.fields else None, errors)
        return data


@admin.register(ApiKey)
class ApiKeyAdmin(AuditedModelAdmin):
    """Keys are created (the plaintext shown once, on the page that follows), rescoped and
    revoked through the audited services; never deleted, since the prediction log names them."""

    form = ApiKeyForm
    audited_by_services = True
    list_display = ["name", "prefix", "rate_limit_per_minute", "created_by", "created_at"]
    list_filter = [("revoked_at", admin.EmptyFieldListFilter)]
    filter_horizontal = ["endpoints"]
    readonly_fields = ["prefix", "created_by", "created_at", "revoked_at"]
    actions = ["revoke"]

    def get_fields(self, request, obj=None):
        editable = ["name", "endpoints", "rate_limit_per_minute"]
        return editable if obj is None else [*editable, *self.readonly_fields]

    def has_change_permission(self, request, obj=None):
        allowed = super().has_change_permission(request, obj)
        return allowed and (obj is None or obj.revoked_at is None)

    def has_delete_permission(self, request, obj=None):
        return False

    def save_model(self, request, obj, form, change):
        fields = {f: form.cleaned_data[f] for f in ("name", "rate_limit_per_minute")}
        endpoints = list(form.cleaned_data["endpoints"])
        if change:
            changes = {f: v for f, v in fields.items() if f in form.changed_data}
            if "endpoints" in form.changed_data:
                changes["endpoints"] = endpoints
            services.api_key_update(key_id=obj.pk, actor=request.user, changes=changes)
        else:
            key, raw = services.api_key_create(
                name=fields["name"],
                endpoints=endpoints,
                created_by=request.user,
                rate_limit_per_minute=fields["rate_limit_per_minute"],
            )
            obj.pk, request._rollgate_new_api_key = key.pk, raw

    def save_related(self, request, form, formsets, change):
        pass  # the endpoints are set by the service, with the rest of the key

    def response_add(self, request, obj, post_url_continue=None):
        from django.template.response import TemplateResponse

        return TemplateResponse(
            request,
            "admin/rollouts/apikey/created.html",
            {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "key": ApiKey.objects.get(pk=obj.pk),
                "raw_key": request._rollgate_new_api_key,
                "title": "API key created",
            },
        )

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        for key in queryset:
            services.api_key_revoke(key_id=key.pk, actor=request.user)
        messages.success(request, f"Revoked {queryset.count()} key(s).")

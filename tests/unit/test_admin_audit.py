"""Every write in the Django admin is audited (issue 9, point 7).

The cases are generated from the admin registry: each registered model's add, change and
delete views, wherever a superuser may use them, are driven through the test client with the
admin's own form, and each save or deletion must append an audit event (or be refused with
nothing changed). A model registered later without an entry below fails here until it has one.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from axes.models import AccessAttempt, AccessFailureLog, AccessLog
from django.contrib import admin
from django.contrib.auth.models import Group, User
from django.forms import MultiWidget
from django.test import RequestFactory
from django.urls import reverse
from django.utils import timezone
from knox.models import AuthToken

from monitoring import alerts
from monitoring.models import DriftSettings
from portal.admin_audit import SECRET, AuditedModelAdmin
from portal.models import AuditEvent, Team
from registry.models import RegisteredModel
from rollouts import services
from rollouts.models import ApiKey, Endpoint, Environment, FreezeWindow
from rollouts.serving.runtime import keys as key_table

REGISTRY = sorted(admin.site._registry.items(), key=lambda item: item[0]._meta.label)
LABELS = [model._meta.label for model, _ in REGISTRY]


@pytest.fixture
def world(synced, deploy, platform_admin, team, data_scientist):
    """One row of every model the admin edits: a live staging endpoint, a key, a rule, ..."""
    v1, _ = synced
    endpoint = deploy(v1).endpoint
    services.api_key_create(name="shop", endpoints=[endpoint], created_by=None)
    alerts.alert_rule_create(
        actor=platform_admin, endpoint=endpoint, kind="error_rate", threshold=0.1
    )
    DriftSettings.objects.create(endpoint=endpoint)
    now = timezone.now()
    services.freeze_window_create(
        environment=endpoint.environment,
        actor=platform_admin,
        starts_at=now + timedelta(days=1),
        ends_at=now + timedelta(days=2),
        reason="quarter close",
    )
    AuthToken.objects.create(user=data_scientist)
    AccessAttempt.objects.create(
        username="mallory", ip_address="10.0.0.1", user_agent="x", failures_since_start=5
    )
    AccessLog.objects.create(username="alice", ip_address="10.0.0.2", user_agent="x")
    AccessFailureLog.objects.create(username="mallory", ip_address="10.0.0.1", user_agent="x")
    return endpoint


#: What the change test edits on each model whose admin has a change form with editable
#: fields: field -> new value, as the form posts it (callables get the world's endpoint).
CHANGES = {
    "auth.Group": {"name": "reviewers-renamed"},
    "auth.User": {"email": "alice@new.example.com", "is_staff": "on"},
    "portal.Team": {"name": "Diagnostics renamed"},
    "registry.RegisteredModel": {"team": lambda world: ""},
    "rollouts.Environment": {"required_approvals": "1"},
    "rollouts.Endpoint": {"max_body_bytes": "65536"},
    "rollouts.ApiKey": {"rate_limit_per_minute": "30"},
    "monitoring.AlertRule": {"threshold": "0.2"},
    "monitoring.DriftSettings": {"psi_drift": "0.3"},
}

#: A complete add form for each model an admin can add.
ADDS = {
    "auth.Group": lambda world: {"name": "auditors"},
    "auth.User": lambda world: {
        "username": "newcomer",
        "password1": "a-long-enough-passphrase-1",
        "password2": "a-long-enough-passphrase-1",
        "usable_password": "true",
    },
    "portal.Team": lambda world: {"name": "Vision", "slug": "vision"},
    "rollouts.Environment": lambda world: {
        "name": "qa",
        "description": "",
        "order": "5",
        "required_approvals": "1",
        "approver_group": str(Group.objects.get(name="reviewers").pk),
        "metric_tolerance": "0.05",
        "request_expiry_days": "7",
        "gates": '["model_loads"]',
        "allowed_strategies": '["direct", "canary"]',
        "rollout_defaults": '{"canary": {"interval_s": 60}}',
        "analysis_policy": "{}",
    },
    "rollouts.FreezeWindow": lambda world: {
        "environment": str(world.environment_id),
        "starts_at_0": str((timezone.now() + timedelta(days=3)).date()),
        "starts_at_1": "00:00:00",
        "ends_at_0": str((timezone.now() + timedelta(days=4)).date()),
        "ends_at_1": "00:00:00",
        "reason": "migration",
    },
    "rollouts.ApiKey": lambda world: {"name": "crm", "endpoints": [str(world.pk)]},
    "monitoring.AlertRule": lambda world: {
        "endpoint": str(world.pk),
        "kind": "error_rate",
        "threshold": "0.5",
        "granularity": "hour",
        "percentile": "95",
        "label_delay_hours": "24",
        "window_hours": "1",
        "min_samples": "20",
        "action": "notify",
        "enabled": "on",
    },
    "monitoring.DriftSettings": lambda world: {
        "endpoint": str(
            Endpoint.objects.exclude(drift_settings__isnull=False).values_list("pk", flat=True)[0]
            if Endpoint.objects.exclude(drift_settings__isnull=False).exists()
            else world.pk
        ),
        "psi_warning": "0.1",
        "psi_drift": "0.25",
        "wasserstein": "0.1",
        "jensen_shannon": "0.1",
        "missing_change": "0.1",
        "drift_share": "0.5",
        "feature_thresholds": "{}",
    },
}


def _admin_request(user):
    request = RequestFactory().get("/admin/")
    request.user = user
    return request


def _form_data(model_admin, request, obj) -> dict:
    """What the admin's change form posts for ``obj`` as it stands."""
    form = model_admin.get_form(request, obj, change=True)(instance=obj)
    data = {}
    for name, field in form.fields.items():
        value = form[name].value()
        if isinstance(field.widget, MultiWidget):
            for i, part in enumerate(field.widget.decompress(value)):
                data[f"{name}_{i}"] = "" if part is None else str(part)
        elif isinstance(value, bool):
            if value:
                data[name] = "on"
        elif isinstance(value, list | tuple):
            data[name] = [str(v) for v in value]
        else:
            data[name] = "" if value is None else str(value)
    return data


def _instance(model):
    return model._default_manager.order_by("pk").first()


def test_the_registry_is_covered_and_every_admin_is_audited():
    for model, model_admin in REGISTRY:
        assert isinstance(model_admin, AuditedModelAdmin), model._meta.label
        assert not model_admin.get_inline_instances(_admin_request(None)), (
            f"{model._meta.label} has inlines: extend _form_data for their formsets"
        )
    assert set(LABELS) >= set(CHANGES) | set(ADDS)


@pytest.mark.parametrize("label", LABELS)
def test_a_change_in_the_admin_is_audited(label, world, client, platform_admin):
    model, model_admin = next(item for item in REGISTRY if item[0]._meta.label == label)
    obj = _instance(model)
    request = _admin_request(platform_admin)
    if obj is None or not model_admin.has_change_permission(request, obj):
        assert label not in CHANGES or obj is None, f"{label}: no change permission"
        return
    data = _form_data(model_admin, request, obj)
    if label not in CHANGES:
        # Only read-only fields: posting the form changes nothing and audits nothing.
        assert not [f for f in data if f not in model_admin.get_readonly_fields(request, obj)], (
            f"{label} has editable fields: add what to change to CHANGES"
        )
        return
    for name, value in CHANGES[label].items():
        data[name] = value(world) if callable(value) else value
    client.force_login(platform_admin)
    events = AuditEvent.objects.count()
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_change", args=[obj.pk])
    response = client.post(url, {**data, "_save": "Save"})
    assert response.status_code == 302, (label, getattr(response, "context_data", {}).get("errors"))
    assert AuditEvent.objects.count() > events, f"{label}: changed in the admin, not audited"
    event = AuditEvent.objects.latest("id")
    assert (event.object_type, event.object_id) == (label, str(obj.pk))
    assert event.actor == platform_admin


@pytest.mark.parametrize("label", LABELS)
def test_a_deletion_in_the_admin_is_audited(label, world, client, platform_admin):
    model, model_admin = next(item for item in REGISTRY if item[0]._meta.label == label)
    obj = _instance(model)
    if label == "auth.User":
        obj = (
            User.objects.get(username="mallory")
            if User.objects.filter(username="mallory").exists()
            else User.objects.create(username="mallory")
        )
    if obj is None or not model_admin.has_delete_permission(_admin_request(platform_admin), obj):
        return
    client.force_login(platform_admin)
    events = AuditEvent.objects.count()
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_delete", args=[obj.pk])
    response = client.post(url, {"post": "yes"})
    assert response.status_code == 302, label
    assert AuditEvent.objects.count() > events, f"{label}: deleted in the admin, not audited"
    event = AuditEvent.objects.latest("id")
    assert event.object_type == label and event.actor == platform_admin
    assert not model._default_manager.filter(pk=obj.pk).exists()


@pytest.mark.parametrize("label", LABELS)
def test_an_addition_in_the_admin_is_audited(label, world, client, platform_admin):
    model, model_admin = next(item for item in REGISTRY if item[0]._meta.label == label)
    if not model_admin.has_add_permission(_admin_request(platform_admin)):
        assert label not in ADDS, f"{label}: no add permission"
        return
    assert label in ADDS, f"{label} can be added in the admin: add a complete form to ADDS"
    if label == "monitoring.DriftSettings":
        DriftSettings.objects.all().delete()
    client.force_login(platform_admin)
    before = set(model._default_manager.values_list("pk", flat=True))
    events = AuditEvent.objects.count()
    url = reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_add")
    response = client.post(url, {**ADDS[label](world), "_save": "Save"})
    assert response.status_code in (200, 302), label
    created = set(model._default_manager.values_list("pk", flat=True)) - before
    assert len(created) == 1, (label, getattr(response, "context_data", {}).get("errors"))
    (pk,) = created
    event = AuditEvent.objects.filter(object_type=label, object_id=str(pk)).latest("id")
    assert event.actor == platform_admin and AuditEvent.objects.count() > events


# --- what the generated cases cannot see: values, secrets, caches, refusals -------------------


def test_team_membership_and_group_changes_record_who_before_and_after(
    world, client, platform_admin, reviewer, data_scientist
):
    client.force_login(platform_admin)
    team = Team.objects.get()
    data = _form_data(admin.site._registry[Team], _admin_request(platform_admin), team)
    data["members"] = [str(reviewer.pk)]
    assert client.post(reverse("admin:portal_team_change", args=[team.pk]), data).status_code == 302
    event = AuditEvent.objects.latest("id")
    assert event.action == "admin.changed"
    assert event.before == {"members": ["alice"]} and event.after == {"members": ["bob"]}

    user_admin = admin.site._registry[User]
    data = _form_data(user_admin, _admin_request(platform_admin), data_scientist)
    data["groups"] = [str(Group.objects.get(name="reviewers").pk)]
    url = reverse("admin:auth_user_change", args=[data_scientist.pk])
    assert client.post(url, data).status_code == 302
    event = AuditEvent.objects.latest("id")
    # Only what was changed: sign-in times are read-only (the form would trim them).
    assert event.before == {"groups": ["data scientists"]}
    assert event.after == {"groups": ["reviewers"]}


def test_a_password_set_in_the_admin_is_audited_without_its_hash(client, platform_admin, reviewer):
    client.force_login(platform_admin)
    url = reverse("admin:auth_user_password_change", args=[reviewer.pk])
    new = "another-long-passphrase-2"
    response = client.post(url, {"password1": new, "password2": new, "usable_password": "true"})
    assert response.status_code == 302
    event = AuditEvent.objects.latest("id")
    assert (event.action, event.object_id) == ("admin.changed", str(reviewer.pk))
    reviewer.refresh_from_db()
    assert reviewer.password not in str(event.after) and reviewer.check_password(new)


def test_a_new_user_is_audited_with_its_password_hash_kept_secret(client, platform_admin):
    client.force_login(platform_admin)
    client.post(reverse("admin:auth_user_add"), {**ADDS["auth.User"](None), "_save": "Save"})
    event = AuditEvent.objects.filter(object_type="auth.User").latest("id")
    assert event.action == "admin.added" and event.after["password"] == SECRET


def test_an_api_key_made_in_the_admin_is_shown_once_and_works(world, client, platform_admin):
    client.force_login(platform_admin)
    response = client.post(
        reverse("admin:rollouts_apikey_add"),
        {"name": "crm", "endpoints": [str(world.pk)], "rate_limit_per_minute": "60"},
    )
    assert response.status_code == 200
    raw = response.context["raw_key"]
    key = ApiKey.objects.get(name="crm")
    assert key.key_hash == services.api_key_hash(raw) and raw not in key.key_hash
    assert key.rate_limit_per_minute == 60
    event = AuditEvent.objects.filter(action="api_key.created").latest("id")
    assert event.actor == platform_admin and raw not in str(event.after)
    page = client.get(reverse("admin:rollouts_apikey_change", args=[key.pk]))
    assert raw not in page.content.decode()  # shown once, never again


def test_an_api_key_rescoped_in_the_admin_is_audited_and_reloaded(world, client, platform_admin):
    key = ApiKey.objects.get(name="shop")
    key_table.invalidate()
    generation = key_table.generation if hasattr(key_table, "generation") else None
    client.force_login(platform_admin)
    data = _form_data(admin.site._registry[ApiKey], _admin_request(platform_admin), key)
    data["rate_limit_per_minute"] = "5"
    response = client.post(reverse("admin:rollouts_apikey_change", args=[key.pk]), data)
    assert response.status_code == 302
    event = AuditEvent.objects.latest("id")
    assert event.action == "api_key.changed"
    assert event.before == {"rate_limit_per_minute": None}
    assert event.after == {"rate_limit_per_minute": 5}
    if generation is not None:
        assert key_table.generation != generation


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("rate_limit_per_minute", "0", "1 to 1,000,000"),
        ("rate_limit_per_minute", "99999999999", "1 to 1,000,000"),
        ("rate_limit_per_minute", "-3", "greater than or equal to 0"),
        ("name", "   ", "required"),
        ("endpoints", [], "required"),
    ],
)
def test_a_bad_api_key_in_the_admin_is_a_field_error_with_nothing_saved(
    world, client, platform_admin, field, value, message
):
    key = ApiKey.objects.get(name="shop")
    client.force_login(platform_admin)
    data = _form_data(admin.site._registry[ApiKey], _admin_request(platform_admin), key)
    data[field] = value
    events = AuditEvent.objects.count()
    response = client.post(reverse("admin:rollouts_apikey_change", args=[key.pk]), data)
    assert response.status_code == 200
    assert message in str(response.context["adminform"].form.errors)
    assert AuditEvent.objects.count() == events
    fresh = ApiKey.objects.get(pk=key.pk)
    assert (fresh.name, fresh.rate_limit_per_minute) == ("shop", None)
    assert list(fresh.endpoints.all()) == [world]


def test_keys_are_never_deleted_and_revoked_keys_not_edited(world, client, platform_admin):
    key = ApiKey.objects.get(name="shop")
    client.force_login(platform_admin)
    url = reverse("admin:rollouts_apikey_delete", args=[key.pk])
    assert client.post(url, {"post": "yes"}).status_code == 403
    services.api_key_revoke(key_id=key.pk, actor=platform_admin)
    data = _form_data(admin.site._registry[ApiKey], _admin_request(platform_admin), key)
    data["rate_limit_per_minute"] = "5"
    change = reverse("admin:rollouts_apikey_change", args=[key.pk])
    assert client.post(change, data).status_code == 403
    assert ApiKey.objects.get(pk=key.pk).rate_limit_per_minute is None


def test_endpoint_names_cannot_be_edited(world, client, platform_admin):
    client.force_login(platform_admin)
    data = _form_data(admin.site._registry[Endpoint], _admin_request(platform_admin), world)
    data["name"] = "renamed"
    client.post(reverse("admin:rollouts_endpoint_change", args=[world.pk]), data)
    assert Endpoint.objects.get(pk=world.pk).name == world.name


def test_a_bad_policy_saves_nothing_and_says_so(world, client, platform_admin):
    env = Environment.objects.get(name="production")
    client.force_login(platform_admin)
    data = _form_data(admin.site._registry[Environment], _admin_request(platform_admin), env)
    data.update(required_approvals="7", description="half of a change")
    events = AuditEvent.objects.count()
    response = client.post(reverse("admin:rollouts_environment_change", args=[env.pk]), data)
    assert response.status_code == 200 and "changed successfully" not in response.content.decode()
    assert Environment.objects.get(pk=env.pk).description == env.description
    assert AuditEvent.objects.count() == events


def test_unassigning_a_team_in_the_admin_is_audited_as_a_team_change(world, client, platform_admin):
    model = RegisteredModel.objects.get()
    client.force_login(platform_admin)
    data = _form_data(admin.site._registry[RegisteredModel], _admin_request(platform_admin), model)
    data["team"] = ""
    assert (
        client.post(
            reverse("admin:registry_registeredmodel_change", args=[model.pk]), data
        ).status_code
        == 302
    )
    event = AuditEvent.objects.latest("id")
    assert event.action == "registry.team_assigned" and event.after == {"team": None}
    assert FreezeWindow.objects.exists()  # the world is whole: nothing else was touched


# --- the portal's API-key page ------------------------------------------------------------


def test_the_portal_page_creates_a_key_shown_once_and_revokes_it(world, client, platform_admin):
    client.force_login(platform_admin)
    url = reverse("rollouts:api_keys")
    response = client.post(
        url, {"name": "crm", "endpoints": [world.pk], "rate_limit_per_minute": "120"}
    )
    assert response.status_code == 302 and response["Location"] == url  # post, redirect, get
    shown = client.get(url)
    assert shown["Cache-Control"] == "no-store"
    raw = shown.context["raw_key"]
    assert raw in shown.content.decode()
    key = ApiKey.objects.get(name="crm")
    assert key.key_hash == services.api_key_hash(raw) and key.rate_limit_per_minute == 120
    again = client.get(url)  # a reload: shown once, and no second key
    assert raw not in again.content.decode() and ApiKey.objects.filter(name="crm").count() == 1
    revoke = reverse("rollouts:api_key_revoke", args=[key.pk])
    assert client.post(revoke).status_code == 302
    assert ApiKey.objects.get(pk=key.pk).revoked_at is not None
    assert AuditEvent.objects.latest("id").action == "api_key.revoked"
    assert client.post(reverse("rollouts:api_key_revoke", args=[10**6])).status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {"name": "", "endpoints": ["1"]},
        {"name": "crm"},
        {"name": "crm", "endpoints": ["999999"]},
        {"name": "crm", "endpoints": ["1"], "rate_limit_per_minute": "0"},
        {"name": "crm", "endpoints": ["1"], "rate_limit_per_minute": "1e9"},
        {"name": "x" * 101, "endpoints": ["1"]},
    ],
)
def test_a_bad_key_on_the_portal_page_is_a_400_with_nothing_saved(
    world, client, platform_admin, body
):
    client.force_login(platform_admin)
    if body.get("endpoints") == ["1"]:
        body = {**body, "endpoints": [str(world.pk)]}
    keys, events = ApiKey.objects.count(), AuditEvent.objects.count()
    response = client.post(reverse("rollouts:api_keys"), body)
    assert response.status_code == 400 and "errorlist" in response.content.decode()
    assert (ApiKey.objects.count(), AuditEvent.objects.count()) == (keys, events)

"""Who may call what: every page and API route x every persona, with the expected status.

The routes are read from the URL configuration, so a new route without an entry in ``MATRIX``
(or, with a reason, in ``EXEMPT``) fails ``test_every_route_has_an_entry``. Each call runs in a
savepoint that is rolled back afterwards, so every persona meets the same world; a refused call
must not have written anything (no new audit event).
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.db import transaction
from django.urls import URLPattern, URLResolver, get_resolver, reverse
from django.utils import timezone

from monitoring import alerts
from monitoring.models import Alert, DriftBaseline, DriftRollup
from portal.models import AuditEvent
from rollouts import services
from rollouts.models import Endpoint, Environment
from tests.conftest import REGISTERED_MODEL, TEAM

PERSONAS = (
    "data_scientist",  # of the team that owns the model
    "other_data_scientist",
    "reviewer",
    "manager",
    "platform_admin",
    "anonymous",
)


def S(ds: int, other: int, reviewer: int, manager: int, admin: int, anonymous: int) -> dict:
    """Expected statuses in the order of ``PERSONAS``."""
    return dict(zip(PERSONAS, (ds, other, reviewer, manager, admin, anonymous), strict=True))


# Pages send anonymous users to the login page (302); the API answers 403 (session
# authentication comes first, and it has no WWW-Authenticate challenge) or 401 where an API key
# scheme comes first. A data scientist of another team gets 404 for the owning team's objects.
ALL_PAGE = S(200, 200, 200, 200, 200, 302)
OWN_PAGE = S(200, 404, 200, 200, 200, 302)
ALL_API = S(200, 200, 200, 200, 200, 403)
OWN_API = S(200, 404, 200, 200, 200, 403)
ADMIN_API = S(403, 403, 403, 403, 200, 403)

MATRIX: dict[str, dict[str, dict[str, int]]] = {
    # --- pages ---
    "home": {"GET": ALL_PAGE},
    "login": {"GET": S(200, 200, 200, 200, 200, 200)},
    "logout": {"GET": S(405, 405, 405, 405, 405, 405), "POST": S(302, 302, 302, 302, 302, 302)},
    "audit": {"GET": ALL_PAGE},
    "audit_export": {"GET": ALL_PAGE},
    "registry:catalog": {"GET": ALL_PAGE},
    "registry:sync": {"POST": S(302, 302, 302, 403, 302, 302)},
    "registry:model": {"GET": OWN_PAGE},
    "registry:compare": {"GET": OWN_PAGE},
    "registry:version": {"GET": OWN_PAGE},
    "rollouts:requests": {"GET": ALL_PAGE},
    "rollouts:request_create": {
        "GET": S(200, 404, 403, 403, 403, 302),
        "POST": S(302, 404, 403, 403, 403, 302),
    },
    "rollouts:request": {"GET": OWN_PAGE},
    "rollouts:request_approve": {"POST": S(403, 404, 302, 403, 403, 302)},
    "rollouts:request_reject": {"POST": S(403, 404, 302, 403, 403, 302)},
    "rollouts:request_cancel": {"POST": S(302, 404, 403, 403, 403, 302)},
    "rollouts:request_comment": {"POST": S(302, 404, 302, 302, 302, 302)},
    "rollouts:request_override_freeze": {"POST": S(403, 404, 403, 403, 302, 302)},
    "rollouts:endpoints": {"GET": ALL_PAGE},
    "rollouts:endpoint_timeline": {"GET": OWN_PAGE},
    "rollouts:endpoint_rollback": {"POST": S(403, 404, 302, 403, 302, 302)},
    "rollouts:api_keys": {
        "GET": S(403, 403, 403, 403, 200, 302),
        "POST": S(403, 403, 403, 403, 302, 302),
    },
    "rollouts:api_key_revoke": {"POST": S(403, 403, 403, 403, 302, 302)},
    "rollouts:rollout": {"GET": OWN_PAGE},
    "rollouts:rollout_control": {"POST": S(403, 404, 302, 403, 302, 302)},
    "monitoring:endpoint": {"GET": OWN_PAGE},
    "monitoring:alerts": {"GET": ALL_PAGE},
    "monitoring:alert": {"GET": OWN_PAGE},
    "monitoring:alert_acknowledge": {"POST": S(302, 404, 302, 403, 302, 302)},
    "monitoring:alert_rule_create": {
        "GET": S(403, 403, 403, 403, 200, 302),
        "POST": S(403, 403, 403, 403, 302, 302),
    },
    "monitoring:alert_rule_edit": {
        "GET": S(403, 404, 403, 403, 200, 302),
        "POST": S(403, 404, 403, 403, 302, 302),
    },
    "monitoring:alert_rule_enabled": {"POST": S(403, 404, 403, 403, 302, 302)},
    "monitoring:drift_histogram": {"GET": OWN_PAGE},
    "monitoring:drift_baseline": {"POST": S(302, 404, 403, 403, 302, 302)},
    # --- API ---
    "api-schema": {"GET": ALL_API},
    "api-models": {"GET": ALL_API},
    "api-model": {"GET": OWN_API},
    "api-model-version": {"GET": OWN_API},
    "api-model-compare": {"GET": OWN_API},
    "api-registry-sync": {"POST": S(202, 202, 202, 403, 202, 403)},
    # A version the user may not see is as unknown as a missing one: 400 on its field.
    "api-requests": {"GET": ALL_API, "POST": S(201, 400, 403, 403, 403, 403)},
    "api-request": {"GET": OWN_API},
    "api-request-approve": {"POST": S(403, 404, 200, 403, 403, 403)},
    "api-request-reject": {"POST": S(403, 404, 200, 403, 403, 403)},
    "api-request-cancel": {"POST": S(200, 404, 403, 403, 403, 403)},
    "api-request-resubmit": {"POST": S(201, 404, 403, 403, 403, 403)},
    "api-request-override-freeze": {"POST": S(403, 404, 403, 403, 200, 403)},
    "api-request-comments": {"GET": OWN_API, "POST": S(201, 404, 201, 201, 201, 403)},
    "api-rollout": {"GET": OWN_API},
    "api-rollout-control": {"POST": S(403, 404, 200, 403, 200, 403)},
    "api-environments": {"GET": ALL_API},
    "api-environment": {"GET": ALL_API, "PATCH": ADMIN_API},
    "api-environment-freeze-windows": {"GET": ALL_API, "POST": S(403, 403, 403, 403, 201, 403)},
    "api-api-keys": {"GET": ADMIN_API, "POST": S(403, 403, 403, 403, 201, 403)},
    "api-api-key-revoke": {"POST": ADMIN_API},
    "api-endpoints": {"GET": ALL_API},
    "api-endpoint-timeline": {"GET": OWN_API},
    "api-endpoint-rollback": {"POST": S(403, 404, 200, 403, 200, 403)},
    "api-endpoint-metrics": {"GET": OWN_API},
    "api-feedback": {"POST": S(200, 200, 200, 200, 200, 401)},
    "api-teams": {"GET": ALL_API, "POST": S(403, 403, 403, 403, 201, 403)},
    "api-team-member": {"POST": ADMIN_API, "DELETE": S(403, 403, 403, 403, 204, 403)},
    "api-audit": {"GET": ALL_API},
    "api-audit-csv": {"GET": ALL_API},
}

EXEMPT: dict[str, str] = {
    # The serving data plane answers client applications, not personas: an API key per
    # endpoint (``Authorization: Bearer``), covered route by route in test_serving_api.py.
    "serving:invocations": "API key of a client application; tests/unit/test_serving_api.py",
    "serving:ping": "readiness probe: up/down only without the endpoint's key; test_serving_api.py",
    "health": "load-balancer probe, public as MLflow's scoring server /health",
    "ping": "load-balancer probe, public as MLflow's scoring server /ping",
    "version": "MLflow version for clients, public as MLflow's scoring server /version",
    # MLflow's registry calls it, authenticated by the HMAC signature of each delivery.
    "metrics": "Prometheus scrape: METRICS_SCRAPE_TOKEN or METRICS_ALLOWED_NETWORKS; test_security",
    "registry:webhook": "HMAC-signed MLflow deliveries; tests/integration/test_webhooks.py",
    # API tokens of people: login by password (any user), logout by token; test_security.py.
    "api-auth-token": "username+password -> token, axes lockout; tests/unit/test_security.py",
    "api-auth-logout": "knox token of the caller only; tests/unit/test_security.py",
    "api-auth-logoutall": "knox token of the caller only; tests/unit/test_security.py",
}

# Allowed writes that leave no audit event of their own: the session, a sync sent on commit
# (the sync audits what it changes), and ground truth.
UNAUDITED_WRITES = {"logout", "registry:sync", "api-registry-sync", "api-feedback"}

# Mounted apps whose routes are not Rollgate's: Django's admin has its own permission system.
SKIPPED_PREFIXES = ("admin/", "static/", "media/")


def url_routes(patterns=None, prefix: str = "", namespace: str = "") -> list[tuple[str, str]]:
    """(route name with its namespace, path) for every pattern of the URL configuration."""
    routes = []
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        path = prefix + str(pattern.pattern)
        if isinstance(pattern, URLResolver):
            if path.startswith(SKIPPED_PREFIXES):
                continue
            inner = f"{namespace}{pattern.namespace}:" if pattern.namespace else namespace
            routes += url_routes(pattern.url_patterns, path, inner)
        elif isinstance(pattern, URLPattern):
            name = f"{namespace}{pattern.name}" if pattern.name else f"<unnamed: {path}>"
            routes.append((name, path))
    return routes


def assert_every_route_has_an_entry() -> None:
    routes = url_routes()
    names = Counter(name for name, _ in routes)
    assert not [n for n in names if n.startswith("<unnamed")], "name every route"
    assert [n for n, count in names.items() if count > 1] == [], "route names must be unique"
    missing = sorted(set(names) - MATRIX.keys() - EXEMPT.keys())
    assert missing == [], f"routes without an entry in MATRIX (or EXEMPT): {missing}"
    stale = sorted((MATRIX.keys() | EXEMPT.keys()) - set(names))
    assert stale == [], f"MATRIX or EXEMPT names routes that no longer exist: {stale}"
    assert not MATRIX.keys() & EXEMPT.keys()
    for name, methods in MATRIX.items():
        for method, expected in methods.items():
            assert tuple(expected) == PERSONAS, (name, method)


def test_every_route_has_an_entry():
    assert_every_route_has_an_entry()


def test_the_walk_finds_pages_and_api_routes():
    paths = dict(url_routes())
    assert paths["rollouts:request"] == "rollouts/requests/<int:request_id>/"
    assert paths["api-request-approve"] == "api/requests/<int:request_id>/approve"
    assert not any(path.startswith("admin/") for path in paths.values())


# --- the world every persona meets ----------------------------------------------------------


@pytest.fixture
def world(
    synced,
    deploy,
    awaiting_review,
    data_scientist,
    other_data_scientist,
    reviewer,
    manager,
    platform_admin,
):
    """``breast-cancer-classifier`` (team ``diagnostics``): v2 live on staging after v1 (so a
    rollback has somewhere to go), v1 awaiting review for production, v2's production request
    rejected, and an API key for the staging endpoint."""
    v1, v2 = synced
    Environment.objects.filter(name="staging").update(metric_tolerance=1.0)
    deploy(v1, "staging")
    assert deploy(v2, "staging").status == "live"
    pending = awaiting_review(v1, "production")
    assert pending.status == "awaiting_review", pending.status_reason
    # v1 again on staging, as a canary beside v2 (stable): its rollout page and controls
    canary = deploy(v1, "staging", strategy="canary", strategy_params={"interval_s": 600})
    assert canary.status == "rolling_out", canary.status_reason
    rejected = awaiting_review(v2, "production")
    services.deployment_request_reject(request_id=rejected.pk, reviewer=reviewer, comment="later")
    staging = Endpoint.objects.get(environment__name="staging")
    key, _ = services.api_key_create(name="shop", endpoints=[staging], created_by=platform_admin)
    rule = alerts.alert_rule_create(
        actor=platform_admin, endpoint=staging, kind="error_rate", threshold=0.05
    )
    now = timezone.now()
    alert = Alert.objects.create(
        rule=rule,
        endpoint=staging,
        model_version=v2,
        window_start=now,
        window_end=now,
        observed=0.5,
        threshold=0.05,
        message="Error rate 50.0%",
        fired_at=now,
        action=rule.action,
    )
    # a chosen drift baseline, so that going back to the training sample is a real change
    DriftBaseline.objects.create(
        endpoint=staging, model_version=v1, start=now, end=now + timedelta(hours=1), chosen_at=now
    )
    drift = DriftRollup.objects.create(
        endpoint=staging,
        model_version=v2,
        granularity="day",
        window_start=now.replace(hour=0, minute=0, second=0, microsecond=0),
        reference="training sample",
        histograms={
            "mean radius": {
                "kind": "numeric",
                "edges": [0.0, 1.0, 2.0],
                "reference": [0.5, 0.5],
                "current": [0.2, 0.8],
            }
        },
        computed_at=now,
    )
    return SimpleNamespace(
        v1=v1,
        v2=v2,
        pending=pending,
        rejected=rejected,
        canary=canary,
        staging=staging,
        api_key=key,
        rule=rule,
        alert=alert,
        drift=drift,
    )


def _kwargs(route: str, method: str, w: SimpleNamespace) -> dict:
    model, pending, rejected = REGISTERED_MODEL, w.pending.pk, w.rejected.pk
    by_route = {
        "registry:model": {"name": model},
        "registry:compare": {"name": model},
        "registry:version": {"name": model, "version": 1},
        # v2 to production (v1 is the canary on staging, and awaiting review for production)
        "rollouts:request_create": {"name": model, "version": 2},
        "rollouts:request": {"request_id": pending},
        "rollouts:request_approve": {"request_id": pending},
        "rollouts:request_reject": {"request_id": pending},
        "rollouts:request_cancel": {"request_id": pending},
        "rollouts:request_comment": {"request_id": pending},
        "rollouts:request_override_freeze": {"request_id": pending},
        "rollouts:endpoint_timeline": {"name": w.staging.name},
        "rollouts:endpoint_rollback": {"name": w.staging.name},
        "rollouts:api_key_revoke": {"key_id": w.api_key.pk},
        "rollouts:rollout": {"request_id": w.canary.pk},
        "rollouts:rollout_control": {"request_id": w.canary.pk, "action": "pause"},
        "api-rollout": {"request_id": w.canary.pk},
        "api-rollout-control": {"request_id": w.canary.pk, "action": "pause"},
        "monitoring:endpoint": {"name": w.staging.name},
        "monitoring:alert": {"alert_id": w.alert.pk},
        "monitoring:alert_acknowledge": {"alert_id": w.alert.pk},
        "monitoring:alert_rule_edit": {"rule_id": w.rule.pk},
        "monitoring:alert_rule_enabled": {"rule_id": w.rule.pk},
        "monitoring:drift_baseline": {"name": w.staging.name},
        "monitoring:drift_histogram": {
            "name": w.staging.name,
            "rollup_id": w.drift.pk,
            "feature": "mean radius",
        },
        "api-model": {"name": model},
        "api-model-version": {"name": model, "version": 1},
        "api-model-compare": {"name": model},
        "api-request": {"request_id": pending},
        "api-request-approve": {"request_id": pending},
        "api-request-reject": {"request_id": pending},
        "api-request-cancel": {"request_id": pending},
        "api-request-resubmit": {"request_id": rejected},
        "api-request-override-freeze": {"request_id": pending},
        "api-request-comments": {"request_id": pending},
        "api-environment": {"name": "staging"},
        "api-environment-freeze-windows": {"name": "production"},
        "api-api-key-revoke": {"key_id": w.api_key.pk},
        "api-endpoint-timeline": {"name": w.staging.name},
        "api-endpoint-rollback": {"name": w.staging.name},
        "api-endpoint-metrics": {"name": w.staging.name},
        # bob (a reviewer) joins the team; alice (its data scientist) leaves it.
        "api-team-member": {"slug": TEAM, "username": "alice" if method == "DELETE" else "bob"},
    }
    return by_route.get(route, {})


def _body(route: str, method: str, w: SimpleNamespace):
    """A body that is valid for the persona entitled to the call."""
    bodies = {
        "rollouts:request_create": {
            "environment": Environment.objects.get(name="production").pk,
            "strategy": "direct",
            "justification": "j",
        },
        "rollouts:request_approve": {"comment": "fine"},
        "rollouts:request_reject": {"comment": "not now"},
        "rollouts:request_comment": {"body": "a question"},
        "rollouts:request_override_freeze": {"reason": "security fix"},
        "rollouts:endpoint_rollback": {"reason": "bad predictions"},
        "rollouts:api_keys": {"name": "crm", "endpoints": [w.staging.pk]},
        "monitoring:alert_rule_create": {
            "endpoint": w.staging.pk,
            "kind": "latency",
            "threshold": "250",
            "percentile": "99",
            "granularity": "hour",
            "window_hours": "6",
            "min_samples": "100",
            "label_delay_hours": "24",
            "action": "notify",
            "enabled": "on",
        },
        "monitoring:alert_rule_edit": {
            "kind": "error_rate",
            "threshold": "0.2",
            "percentile": "95",
            "granularity": "hour",
            "window_hours": "24",
            "min_samples": "100",
            "label_delay_hours": "24",
            "action": "notify",
            "enabled": "on",
        },
        "monitoring:alert_rule_enabled": {"enabled": "0"},
        "monitoring:drift_baseline": {"version": "1", "clear": "1"},
        "api-requests": {
            "model": REGISTERED_MODEL,
            "version": 2,
            "environment": "production",
            "justification": "j",
        },
        "api-request-approve": {"comment": "fine"},
        "api-request-reject": {"comment": "not now"},
        "api-request-resubmit": {"justification": "retrained"},
        "api-request-override-freeze": {"reason": "security fix"},
        "api-request-comments": {"body": "a question"},
        "api-environment": {"required_approvals": 2},
        "api-environment-freeze-windows": {
            "starts_at": "2030-12-24T00:00:00Z",
            "ends_at": "2030-12-27T00:00:00Z",
            "reason": "holidays",
        },
        "api-api-keys": {"name": "crm", "endpoints": [w.staging.name]},
        "api-endpoint-rollback": {"reason": "bad predictions"},
        "api-feedback": [{"request_id": str(uuid.uuid4()), "label": 1}],
        "api-teams": {"name": "Vision", "slug": "vision"},
    }
    return bodies.get(route, {})


def _call(client, route: str, method: str, w: SimpleNamespace):
    url = reverse(route, kwargs=_kwargs(route, method, w))
    if method == "GET":
        return client.get(url)
    body = _body(route, method, w)
    send = getattr(client, method.lower())
    if route.startswith("api-"):
        return send(url, body, content_type="application/json")
    return send(url, body) if method == "POST" else send(url)


@pytest.mark.parametrize("persona", PERSONAS)
def test_permission_matrix(request, client, world, persona):
    assert_every_route_has_an_entry()
    user = None if persona == "anonymous" else request.getfixturevalue(persona)
    login = reverse("login")
    failures = []
    for route, methods in sorted(MATRIX.items()):
        for method, expected_by_persona in methods.items():
            expected = expected_by_persona[persona]
            if user is not None:
                client.force_login(user)  # again: the logout route ends the session
            with transaction.atomic():
                events = AuditEvent.objects.count()
                response = _call(client, route, method, world)
                written = AuditEvent.objects.count() - events
                transaction.set_rollback(True)
            where = f"{method} {route} as {persona}"
            if response.status_code != expected:
                detail = getattr(response, "content", b"")[:200]
                failures.append(
                    f"{where}: expected {expected}, got {response.status_code} {detail}"
                )
                continue
            refused = expected >= 400 or (persona == "anonymous" and expected == 302)
            if refused and written:
                failures.append(
                    f"{where}: refused with {expected} but wrote {written} audit events"
                )
            if method != "GET" and not refused and route not in UNAUDITED_WRITES and not written:
                failures.append(f"{where}: answered {expected} but recorded no audit event")
            if persona == "anonymous" and expected == 302 and route != "logout":
                if not response["Location"].startswith(login):
                    failures.append(f"{where}: redirected to {response['Location']}, not the login")
    assert failures == [], "\n".join(failures)

"""The REST API route by route: status codes, what changed in the database, and that the fields
a client must not set (status, requester, reviewer, author, ownership) are ignored."""

from __future__ import annotations

import csv
import io

import pytest
from django.contrib.auth.models import Group
from rest_framework.test import APIClient

from portal.models import AuditEvent, Team
from portal.tokens import api_token_create
from registry import mlflow_client
from rollouts import services
from rollouts.models import (
    ApiKey,
    Comment,
    DeploymentRequest,
    Endpoint,
    Environment,
    FreezeWindow,
    Review,
)
from tests.conftest import REGISTERED_MODEL, TEAM
from tests.factories import UserFactory

Status = DeploymentRequest.Status
MODEL = REGISTERED_MODEL


@pytest.fixture
def staging(db):
    return Environment.objects.get(name="staging")


@pytest.fixture
def api(client):
    """The Django test client, logged in as ``api.as_(user)``; JSON bodies."""

    class Api:
        def as_(self, user):
            client.force_login(user)
            return self

        def get(self, url, **params):
            return client.get(url, params)

        def post(self, url, data=None):
            return client.post(url, data or {}, content_type="application/json")

        def patch(self, url, data):
            return client.patch(url, data, content_type="application/json")

        def delete(self, url):
            return client.delete(url)

    return Api()


def _events(action: str) -> int:
    return AuditEvent.objects.filter(action=action).count()


# --- registry ---------------------------------------------------------------------------------


def test_models_list_searches_and_filters_by_team(
    api, synced, data_scientist, other_data_scientist
):
    api.as_(data_scientist)
    rows = api.get("/api/models").json()
    assert [r["name"] for r in rows] == [MODEL]
    assert (
        rows[0]["team"] == TEAM and rows[0]["version_count"] == 2 and rows[0]["latest_version"] == 2
    )
    assert len(api.get("/api/models", q="breast").json()) == 1
    assert api.get("/api/models", q="no such thing").json() == []
    assert len(api.get("/api/models", team=TEAM).json()) == 1
    assert api.get("/api/models", team="research").json() == []
    assert api.as_(other_data_scientist).get("/api/models").json() == []


def test_model_and_version_detail_are_scoped(api, synced, data_scientist, other_data_scientist):
    api.as_(data_scientist)
    model = api.get(f"/api/models/{MODEL}").json()
    assert model["team"] == TEAM and [v["version"] for v in model["versions"]] == [2, 1]
    version = api.get(f"/api/models/{MODEL}/versions/1").json()
    assert version["version"] == 1 and version["status"] == "READY"
    assert version["signature"]["inputs"] and version["input_example"] and version["metrics"]
    assert api.get(f"/api/models/{MODEL}/versions/9").status_code == 404
    assert api.get("/api/models/nope").status_code == 404
    api.as_(other_data_scientist)
    assert api.get(f"/api/models/{MODEL}").status_code == 404
    assert api.get(f"/api/models/{MODEL}/versions/1").status_code == 404


def test_compare_gives_metric_deltas_params_and_signature_diff(api, synced, data_scientist):
    v1, v2 = synced
    api.as_(data_scientist)
    body = api.get(f"/api/models/{MODEL}/compare", a=1, b=2).json()
    assert (body["a"], body["b"]) == (1, 2)
    assert api.get(f"/api/models/{MODEL}/compare").json() == body  # the two latest by default
    accuracy = next(row for row in body["metrics"] if row["name"] == "accuracy")
    assert accuracy["a"] == v1.metrics["accuracy"] and accuracy["b"] == v2.metrics["accuracy"]
    assert accuracy["delta"] == pytest.approx(v2.metrics["accuracy"] - v1.metrics["accuracy"])
    assert {p["name"] for p in body["params"]} == set(v1.params) | set(v2.params)
    assert body["signature"] == {"compatible": True, "outputs_changed": False, "changes": []}
    assert api.get(f"/api/models/{MODEL}/compare", a="x").status_code == 400
    assert api.get(f"/api/models/{MODEL}/compare", a=9, b=1).status_code == 404


def test_registry_sync_is_sent_on_commit(
    api, synced, data_scientist, manager, monkeypatch, django_capture_on_commit_callbacks
):
    from registry import tasks

    sent = []
    monkeypatch.setattr(tasks.sync_registry, "delay", lambda actor_id: sent.append(actor_id))
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = api.as_(manager).post("/api/registry/sync")
    assert response.status_code == 403 and not callbacks
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = api.as_(data_scientist).post("/api/registry/sync")
    assert response.status_code == 202 and response.json() == {"queued": True}
    assert len(callbacks) == 1 and sent == [data_scientist.pk]


# --- deployment requests ----------------------------------------------------------------------


def test_create_ignores_status_requester_and_reviewer_from_the_client(
    api, synced, data_scientist, reviewer
):
    response = api.as_(data_scientist).post(
        "/api/requests",
        {
            "model": MODEL,
            "version": 1,
            "environment": "staging",
            "justification": "better recall",
            "status": "live",
            "requester": reviewer.username,
            "reviewer": reviewer.username,
            "decided_at": "2020-01-01T00:00:00Z",
            "id": 999,
        },
    )
    assert response.status_code == 201, response.content
    req = DeploymentRequest.objects.get()
    # The gates run on commit, which a test transaction never reaches.
    assert req.status == Status.PENDING_GATES and req.requester == data_scientist
    assert req.decided_at is None and req.pk != 999 and not Review.objects.exists()


def test_create_with_a_version_of_another_team_is_refused(api, synced, other_data_scientist):
    response = api.as_(other_data_scientist).post(
        "/api/requests",
        {"model": MODEL, "version": 1, "environment": "staging", "justification": "j"},
    )
    assert response.status_code == 400 and "version" in response.json()
    assert not DeploymentRequest.objects.exists()


def test_detail_shows_gates_reviews_comments_and_approvals(
    api, synced, staging, awaiting_review, data_scientist, reviewer
):
    Environment.objects.filter(pk=staging.pk).update(required_approvals=2)
    req = awaiting_review(synced[0], "staging")
    approved = api.as_(reviewer).post(f"/api/requests/{req.pk}/approve", {"comment": "looks fine"})
    assert approved.status_code == 200, approved.content
    assert api.post(f"/api/requests/{req.pk}/comments", {"body": "one more?"}).status_code == 201
    body = api.as_(data_scientist).get(f"/api/requests/{req.pk}").json()
    assert body["status"] == Status.AWAITING_REVIEW
    assert (body["approvals"], body["required_approvals"]) == (1, 2)
    assert body["approver_group"] == "reviewers"
    assert body["reviews"] == [
        {
            "reviewer": "bob",
            "decision": "approve",
            "comment": "looks fine",
            "created_at": body["reviews"][0]["created_at"],
        }
    ]
    assert [c["body"] for c in body["comments"]] == ["one more?"]
    assert len(body["gate_results"]) == 5 and all(g["passed"] for g in body["gate_results"])
    assert {g["artifact_digest"] for g in body["gate_results"]} == {body["artifact_digest"]}


def test_comments_are_written_as_the_signed_in_user(
    api, synced, awaiting_review, data_scientist, reviewer, other_data_scientist
):
    req = awaiting_review(synced[0], "staging")
    url = f"/api/requests/{req.pk}/comments"
    response = api.as_(reviewer).post(url, {"body": "why now?", "author": "alice"})
    assert response.status_code == 201 and response.json()["author"] == "bob"
    assert Comment.objects.get().author == reviewer
    assert _events("request.commented") == 1
    assert api.post(url, {"body": "   "}).status_code == 400
    assert api.post(url, {}).status_code == 400
    assert [c["body"] for c in api.as_(data_scientist).get(url).json()] == ["why now?"]
    api.as_(other_data_scientist)
    assert api.get(url).status_code == 404
    assert api.post(url, {"body": "peek"}).status_code == 404
    assert Comment.objects.count() == 1 and _events("request.commented") == 1


def test_resubmit_after_rejection_links_the_new_request(
    api, synced, awaiting_review, data_scientist, reviewer
):
    req = awaiting_review(synced[0], "staging")
    url = f"/api/requests/{req.pk}/resubmit"
    assert api.as_(data_scientist).post(url, {"justification": "again"}).status_code == 409
    rejected = api.as_(reviewer).post(f"/api/requests/{req.pk}/reject", {"comment": "no tests"})
    assert rejected.json()["status"] == Status.REJECTED
    assert api.post(url, {"justification": "mine now"}).status_code == 403
    response = api.as_(data_scientist).post(
        url, {"justification": "added tests", "requester": "bob", "status": "approved"}
    )
    assert response.status_code == 201, response.content
    new = DeploymentRequest.objects.get(pk=response.json()["id"])
    assert new.previous_request == req and new.requester == data_scientist
    assert new.status == Status.PENDING_GATES and new.justification == "added tests"
    assert api.post(url, {}).status_code == 400


def test_override_freeze_by_platform_admin_only(
    api, synced, awaiting_review, data_scientist, platform_admin
):
    req = awaiting_review(synced[0], "staging")
    url = f"/api/requests/{req.pk}/override-freeze"
    assert api.as_(data_scientist).post(url, {"reason": "urgent"}).status_code == 403
    assert api.as_(platform_admin).post(url, {}).status_code == 400
    response = api.post(url, {"reason": "security fix", "freeze_override_by": "alice"})
    assert response.status_code == 200 and response.json()["freeze_override_by"] == "dana"
    req.refresh_from_db()
    assert req.freeze_override_reason == "security fix" and req.freeze_override_by == platform_admin
    assert _events("request.freeze_overridden") == 1


def test_domain_errors_map_to_statuses(
    api, synced, awaiting_review, data_scientist, reviewer, monkeypatch
):
    req = awaiting_review(synced[0], "staging")
    # PermissionDenied -> 403 with the service's reason.
    own = api.as_(data_scientist).post(f"/api/requests/{req.pk}/approve")
    assert own.status_code == 403 and "requested this deployment" in own.json()["detail"]
    # Django ValidationError -> 400 with field errors.
    api.as_(reviewer)
    no_comment = api.post(f"/api/requests/{req.pk}/reject", {"comment": ""})
    assert no_comment.status_code == 400 and "comment" in no_comment.json()

    # RegistryError (ServiceUnavailable) -> 503, nothing recorded.
    def unreachable(name, version):
        raise mlflow_client.RegistryError("connection refused")

    monkeypatch.setattr(mlflow_client, "artifact_digest", unreachable)
    down = api.post(f"/api/requests/{req.pk}/approve")
    assert down.status_code == 503 and "connection refused" in down.json()["detail"]
    assert not Review.objects.exists()
    # Conflict -> 409; unknown id -> 404.
    services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    assert api.post(f"/api/requests/{req.pk}/reject", {"comment": "late"}).status_code == 409
    assert api.post("/api/requests/99999/approve").status_code == 404
    assert api.post("/api/api-keys/99999/revoke").status_code == 403  # not a platform admin


# --- environments -----------------------------------------------------------------------------


def test_environments_list_their_policies(api, manager):
    rows = {r["name"]: r for r in api.as_(manager).get("/api/environments").json()}
    assert rows["production"]["required_approvals"] == 2
    assert rows["production"]["requires_live_in"] == "staging"
    assert rows["staging"]["approver_group"] is None and rows["staging"]["gates"]


def test_platform_admin_patches_a_policy_by_names(api, platform_admin, reviewer):
    managers = Group.objects.get_or_create(name="managers")[0]
    for name in ("carol", "heidi", "ivan"):  # three approvals need three approvers
        UserFactory(username=name, roles=["managers"])
    url = "/api/environments/production"
    change = {"required_approvals": 3, "approver_group": "managers", "requires_live_in": None}
    assert api.as_(reviewer).patch(url, change).status_code == 403
    assert Environment.objects.get(name="production").required_approvals == 2
    response = api.as_(platform_admin).patch(
        url, {**change, "name": "prod", "gates": ["model_loads"]}
    )
    assert response.status_code == 200, response.content
    env = Environment.objects.get(name="production")  # the name is not a policy field
    assert (env.required_approvals, env.approver_group, env.requires_live_in) == (3, managers, None)
    assert env.gates == ["model_loads"]
    event = AuditEvent.objects.get(action="environment.policy_changed")
    assert event.before["required_approvals"] == 2 and event.after["approver_group"] == "managers"
    assert api.patch(url, {"approver_group": "nobody"}).status_code == 400
    assert api.patch(url, {"gates": ["vibes"]}).status_code == 400
    assert api.patch(url, {}).status_code == 400
    # staging after production after staging: the promotion path would loop.
    api.patch(url, {"requires_live_in": "staging"})
    loop = api.patch("/api/environments/staging", {"requires_live_in": "production"})
    assert loop.status_code == 400 and "requires_live_in" in loop.json()
    assert _events("environment.policy_changed") == 2
    assert api.patch("/api/environments/nope", {"required_approvals": 1}).status_code == 404


def test_freeze_windows(api, platform_admin, data_scientist):
    url = "/api/environments/production/freeze-windows"
    window = {
        "starts_at": "2030-12-24T00:00:00Z",
        "ends_at": "2030-12-27T00:00:00Z",
        "reason": "holidays",
    }
    assert api.as_(data_scientist).post(url, window).status_code == 403
    assert (
        api.as_(platform_admin).post(url, {**window, "ends_at": "2030-12-01T00:00:00Z"}).status_code
        == 400
    )
    response = api.post(url, window)
    assert response.status_code == 201 and response.json()["environment"] == "production"
    assert FreezeWindow.objects.get().reason == "holidays"
    assert _events("environment.freeze_scheduled") == 1
    listed = api.as_(data_scientist).get(url).json()
    assert [w["reason"] for w in listed] == ["holidays"]
    assert api.get("/api/environments/staging/freeze-windows").json() == []


# --- teams ------------------------------------------------------------------------------------


def test_teams_are_listed_by_scope_and_created_by_platform_admins(
    api, team, other_team, data_scientist, reviewer, platform_admin
):
    assert [t["slug"] for t in api.as_(data_scientist).get("/api/teams").json()] == [TEAM]
    assert api.as_(reviewer).get("/api/teams").json() == []
    assert api.post("/api/teams", {"name": "Vision", "slug": "vision"}).status_code == 403
    api.as_(platform_admin)
    assert {t["slug"] for t in api.get("/api/teams").json()} == {TEAM, "research"}
    response = api.post("/api/teams", {"name": "Vision", "slug": "vision", "members": ["bob"]})
    assert response.status_code == 201 and response.json()["members"] == []
    assert Team.objects.filter(slug="vision").exists() and _events("team.created") == 1
    assert api.post("/api/teams", {"name": "Other", "slug": "vision"}).status_code == 400
    assert api.post("/api/teams", {"name": "Bad", "slug": "not a slug"}).status_code == 400
    assert _events("team.created") == 1


def test_platform_admins_add_and_remove_members(
    api, team, data_scientist, reviewer, platform_admin
):
    url = f"/api/teams/{TEAM}/members/{reviewer.username}"
    assert api.as_(data_scientist).post(url).status_code == 403
    api.as_(platform_admin)
    response = api.post(url)
    assert response.status_code == 200 and response.json()["members"] == ["alice", "bob"]
    assert api.post(url).status_code == 200  # already a member: nothing to record
    assert _events("team.member_added") == 1
    assert api.delete(url).status_code == 204
    assert not team.members.filter(pk=reviewer.pk).exists()
    assert _events("team.member_removed") == 1
    assert api.post(f"/api/teams/{TEAM}/members/nobody").status_code == 404
    assert api.post("/api/teams/nope/members/bob").status_code == 404


# --- API keys ---------------------------------------------------------------------------------


def test_api_key_is_shown_once_and_can_be_revoked(
    api, synced, deploy, platform_admin, data_scientist
):
    deploy(synced[0], "staging")
    endpoint = Endpoint.objects.get(environment__name="staging")
    assert (
        api.as_(data_scientist)
        .post("/api/api-keys", {"name": "crm", "endpoints": [endpoint.name]})
        .status_code
        == 403
    )
    assert api.get("/api/api-keys").status_code == 403
    api.as_(platform_admin)
    assert api.post("/api/api-keys", {"name": "crm", "endpoints": []}).status_code == 400
    assert api.post("/api/api-keys", {"name": "crm", "endpoints": ["nope"]}).status_code == 400
    response = api.post(
        "/api/api-keys", {"name": "crm", "endpoints": [endpoint.name], "revoked_at": None}
    )
    assert response.status_code == 201, response.content
    created = response.json()
    raw = created["key"]
    key = ApiKey.objects.get()
    assert raw.startswith("rg_") and key.key_hash == services.api_key_hash(raw)
    assert created["endpoints"] == [endpoint.name] and created["created_by"] == "dana"
    assert all("key" not in row for row in api.get("/api/api-keys").json())
    # The key works for a client application until it is revoked.
    scoring = APIClient()
    scoring.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert scoring.post("/api/feedback", [], format="json").status_code == 400  # authenticated
    assert api.post(f"/api/api-keys/{key.pk}/revoke").json()["revoked_at"] is not None
    assert api.post(f"/api/api-keys/{key.pk}/revoke").status_code == 200
    assert _events("api_key.revoked") == 1
    assert scoring.post("/api/feedback", [], format="json").status_code == 401


# --- endpoints --------------------------------------------------------------------------------


def test_endpoint_timeline_and_rollback(
    api, synced, deploy, staging, data_scientist, other_data_scientist, reviewer, manager
):
    v1, v2 = synced
    Environment.objects.filter(pk=staging.pk).update(metric_tolerance=1.0)
    deploy(v1, "staging")
    deploy(v2, "staging")
    endpoint = Endpoint.objects.get(environment=staging)
    timeline = f"/api/endpoints/{endpoint.name}/timeline"
    rollback = f"/api/endpoints/{endpoint.name}/rollback"
    rows = api.as_(data_scientist).get(timeline).json()
    assert [r["traffic"] for r in rows] == [{"v1": 100}, {"v2": 100}]
    assert rows[0]["end"] == rows[1]["start"] and rows[1]["end"] is None
    assert [e["name"] for e in api.get("/api/endpoints").json()] == [endpoint.name]
    assert api.post(rollback, {"reason": "worse"}).status_code == 403
    api.as_(other_data_scientist)
    assert api.get("/api/endpoints").json() == []
    assert api.get(timeline).status_code == 404
    assert api.post(rollback, {"reason": "worse"}).status_code == 404
    assert api.as_(manager).post(rollback, {"reason": "worse"}).status_code == 403
    assert api.as_(reviewer).post(rollback, {}).status_code == 400
    assert _events("deployment.rolled_back") == 0
    response = api.post(rollback, {"reason": "recall dropped"})
    assert response.status_code == 200, response.content
    assert response.json()["version"] == 1 and response.json()["status"] == Status.LIVE
    assert [r["traffic"] for r in api.get(timeline).json()][-1] == {"v1": 100}
    assert api.get("/api/endpoints").json()[0]["traffic"] == {"1": 100}
    assert api.post(rollback, {"reason": "again"}).status_code == 409


# --- audit ------------------------------------------------------------------------------------


def test_audit_is_filtered_and_paginated(
    api, synced, awaiting_review, data_scientist, other_data_scientist, manager, outsider
):
    req = awaiting_review(synced[0], "staging")
    services.deployment_request_comment(request_id=req.pk, author=data_scientist, body="hi")
    page = api.as_(manager).get("/api/audit", limit=2).json()
    assert page["count"] == AuditEvent.objects.count() and len(page["results"]) == 2
    assert page["next"] and page["previous"] is None
    assert page["results"][0]["id"] > page["results"][1]["id"]  # newest first
    rest = api.get("/api/audit", limit=2, offset=2).json()["results"]
    assert {e["id"] for e in rest}.isdisjoint(e["id"] for e in page["results"])
    created = api.get("/api/audit", action="request.created", model=MODEL, environment="staging")
    assert [e["object_id"] for e in created.json()["results"]] == [str(req.pk)]
    assert api.get("/api/audit", actor="alice").json()["count"] == 2
    assert api.get("/api/audit", since="2000-01-01", until="2000-01-02").json()["count"] == 0
    assert api.get("/api/audit", since="yesterday").status_code == 400
    mine = api.as_(data_scientist).get("/api/audit", action="request.created").json()
    assert mine["count"] == 1
    assert api.as_(other_data_scientist).get("/api/audit", model=MODEL).json()["count"] == 0
    assert api.as_(outsider).get("/api/audit").status_code == 403


def test_audit_csv(api, synced, awaiting_review, manager, outsider):
    awaiting_review(synced[0], "staging")
    response = api.as_(manager).get("/api/audit.csv", action="request.created")
    assert response.status_code == 200 and response["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0][:4] == ["id", "created_at", "actor", "action"]
    assert [r[3] for r in rows[1:]] == ["request.created"]
    assert api.get("/api/audit.csv", until="soon").status_code == 400
    assert api.as_(outsider).get("/api/audit.csv").status_code == 403


# --- authentication and schema ----------------------------------------------------------------


def test_token_authentication(synced, awaiting_review, data_scientist, reviewer):
    req = awaiting_review(synced[0], "staging")
    _, raw = api_token_create(user=reviewer, actor=None)
    client = APIClient(enforce_csrf_checks=True)
    assert client.get("/api/requests").status_code == 403  # no credentials
    client.credentials(HTTP_AUTHORIZATION="Token not-a-token")
    refused = client.get("/api/requests")
    # 403 rather than 401: session authentication comes first and sends no challenge.
    assert refused.status_code == 403 and refused.json()["detail"] == "Invalid token."
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert [r["id"] for r in client.get("/api/requests").json()] == [req.pk]
    # No CSRF token is needed with token authentication.
    response = client.post(f"/api/requests/{req.pk}/approve", {"comment": "ok"}, format="json")
    assert response.status_code == 200, response.content
    assert Review.objects.get().reviewer == reviewer
    audit = client.get("/api/audit.csv", HTTP_ACCEPT="text/csv")
    assert audit.status_code == 200 and audit["Content-Type"].startswith("text/csv")


def test_schema_is_for_signed_in_users(client, manager):
    assert client.get("/api/schema").status_code == 403
    client.force_login(manager)
    schema = client.get("/api/schema")
    assert schema.status_code == 200
    for path in (
        b"/api/models/{name}/compare",
        b"/api/requests/{request_id}/resubmit",
        b"/api/environments/{name}/freeze-windows",
        b"/api/teams/{slug}/members/{username}",
        b"/api/api-keys/{key_id}/revoke",
        b"/api/endpoints/{name}/rollback",
        b"/api/audit.csv",
    ):
        assert path in schema.content, path

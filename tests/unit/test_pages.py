"""Every page renders for the personas that may see it, sends anonymous users to the login page
and refuses the rest. The mirror rows are written directly: pages never call MLflow."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from portal.audit import audit_record
from registry.models import ModelVersion, RegisteredModel
from rollouts import services
from rollouts.models import (
    Deployment,
    DeploymentRequest,
    Environment,
    GateResult,
    PredictionLog,
)

PERSONAS = ["data_scientist", "reviewer", "manager", "platform_admin"]
MODEL = "churn"


@pytest.fixture
def world(team, data_scientist, reviewer):
    """A mirrored model of ``team`` with two versions, v1 live on its staging endpoint with
    logged predictions, and a request for v2 whose gates passed, awaiting review."""
    now = timezone.now()
    model = RegisteredModel.objects.create(
        name=MODEL,
        description="Who leaves next month",
        aliases={"staging": 1},
        team=team,
        synced_at=now,
    )
    signature = {
        "inputs": [{"type": "double", "name": "tenure", "required": True}],
        "outputs": [{"type": "long", "required": True}],
        "params": None,
    }
    v1, v2 = (
        ModelVersion.objects.create(
            registered_model=model,
            version=n,
            status="READY",
            run_id=f"run{n}",
            synced_at=now,
            signature=signature,
            metrics={"accuracy": 0.9 + n / 100, "f1": 0.8},
            params={"C": "1.0"},
            flavors=["python_function", "sklearn"],
            input_example={"dataframe_split": {"columns": ["tenure"], "data": [[3.0]]}},
        )
        for n in (1, 2)
    )
    staging = Environment.objects.get(name="staging")
    live = services.deployment_request_create(
        requester=data_scientist, model_version=v1, environment=staging, justification="first"
    )
    DeploymentRequest.objects.filter(pk=live.pk).update(status=DeploymentRequest.Status.LIVE)
    Deployment.objects.create(
        endpoint=live.endpoint,
        model_version=v1,
        request=live,
        status=Deployment.Status.LIVE,
        traffic_weight=100,
        artifact_digest="a" * 64,
        live_at=now,
    )
    for i in range(3):
        PredictionLog.objects.create(
            endpoint=live.endpoint,
            model_version=v1,
            features={"tenure": i},
            prediction=i % 2,
            latency_ms=4.0 + i,
            created_at=now - timedelta(minutes=i),
        )
    pending = services.deployment_request_create(
        requester=data_scientist, model_version=v2, environment=staging, justification="second"
    )
    # The gates' evidence, written directly (the gates themselves need MLflow).
    for name, label in (("model_loads", "loaded"), ("predicts_on_example", "1 rows scored")):
        GateResult.objects.create(
            request=pending, name=name, passed=True, summary=label, artifact_digest="b" * 64
        )
    DeploymentRequest.objects.filter(pk=pending.pk).update(
        status=DeploymentRequest.Status.AWAITING_REVIEW, artifact_digest="b" * 64
    )
    pending.refresh_from_db()
    return {"endpoint": live.endpoint, "pending": pending, "v1": v1, "v2": v2}


def _pages(world) -> list[str]:
    return [
        "/",
        "/registry/",
        f"/registry/{MODEL}/",
        f"/registry/{MODEL}/versions/1/",
        "/rollouts/requests/",
        "/rollouts/requests/?status=awaiting_review",
        f"/rollouts/requests/{world['pending'].pk}/",
        "/rollouts/endpoints/",
        f"/rollouts/endpoints/{world['endpoint'].name}/timeline",
        f"/registry/{MODEL}/compare?a=1&b=2",
        "/audit/",
        "/audit/?action=request.created&actor=alice",
        f"/audit/?model={MODEL}&environment=staging",
        f"/monitoring/endpoints/{world['endpoint'].name}/",
    ]


@pytest.mark.parametrize("persona", PERSONAS)
def test_pages_render_for_personas(request, client, world, persona):
    user = request.getfixturevalue(persona)
    client.force_login(user)
    for url in _pages(world):
        response = client.get(url)
        assert response.status_code == 200, url
        assert user.username.encode() in response.content, (
            url
        )  # the page is theirs, not a login page
    schema = client.get("/api/schema")
    assert schema.status_code == 200
    assert (
        b"/api/feedback" in schema.content
        and b"/api/requests/{request_id}/approve" in schema.content
    )


def test_anonymous_users_go_to_login(client, world):
    for url in [*_pages(world), f"/rollouts/requests/new/{MODEL}/2/"]:
        response = client.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith("/login/?next="), url
    assert client.get("/login/").status_code == 200


def test_request_form_only_for_data_scientists(request, client, world, data_scientist):
    url = f"/rollouts/requests/new/{MODEL}/2/"
    client.force_login(data_scientist)
    response = client.get(url)
    assert response.status_code == 200
    assert b'name="justification"' in response.content
    assert client.get(f"/rollouts/requests/new/{MODEL}/9/").status_code == 404
    for persona in ("reviewer", "manager", "platform_admin", "outsider"):
        client.force_login(request.getfixturevalue(persona))
        assert client.get(url).status_code == 403, persona
        assert client.post(url, {"environment": 1, "justification": "x"}).status_code == 403, (
            persona
        )
    # A data scientist of another team: the model does not exist for them.
    client.force_login(request.getfixturevalue("other_data_scientist"))
    assert client.get(url).status_code == 404
    assert client.post(url, {"environment": 1, "justification": "x"}).status_code == 404
    assert DeploymentRequest.objects.count() == 2


def test_request_deployment_button_only_for_data_scientists(
    client, world, data_scientist, reviewer
):
    client.force_login(data_scientist)
    assert (
        b'data-testid="request-deployment"' in client.get(f"/registry/{MODEL}/versions/2/").content
    )
    client.force_login(reviewer)
    assert (
        b'data-testid="request-deployment"'
        not in client.get(f"/registry/{MODEL}/versions/2/").content
    )


def test_outsider_sees_no_requests_and_no_audit_trail(client, world, outsider):
    client.force_login(outsider)
    assert client.get("/").status_code == 200
    assert client.get(f"/rollouts/requests/{world['pending'].pk}/").status_code == 404
    listing = client.get("/rollouts/requests/")
    assert listing.status_code == 200
    assert list(listing.context["requests"]) == []
    assert client.get("/audit/").status_code == 403
    assert list(client.get("/").context["recent_events"]) == []


def test_another_teams_data_scientist_sees_nothing_of_the_model(
    client, world, other_data_scientist
):
    client.force_login(other_data_scientist)
    endpoint = world["endpoint"].name
    for url in (
        f"/registry/{MODEL}/",
        f"/registry/{MODEL}/versions/1/",
        f"/registry/{MODEL}/compare",
        f"/rollouts/requests/{world['pending'].pk}/",
        f"/rollouts/endpoints/{endpoint}/timeline",
        f"/monitoring/endpoints/{endpoint}/",
    ):
        assert client.get(url).status_code == 404, url
    assert (
        client.post(f"/rollouts/endpoints/{endpoint}/rollback", {"reason": "x"}).status_code == 404
    )
    # Lists and the audit trail show nothing of it.
    assert list(client.get("/registry/").context["models"]) == []
    listing = client.get("/rollouts/requests/")
    assert list(listing.context["requests"]) == [] and list(listing.context["queue"]) == []
    assert client.get("/rollouts/endpoints/").context["rows"] == []
    audit = client.get("/audit/")
    assert audit.status_code == 200 and list(audit.context["page"]) == []
    home = client.get("/")
    assert home.context["summaries"] == [] and list(home.context["recent_events"]) == []
    for url in ("/", "/registry/", "/rollouts/requests/", "/rollouts/endpoints/", "/audit/"):
        assert MODEL.encode() not in client.get(url).content, url


def test_detail_page_offers_decisions_to_other_reviewers_only(
    client, world, reviewer, manager, data_scientist
):
    url = f"/rollouts/requests/{world['pending'].pk}/"
    client.force_login(reviewer)
    page = client.get(url).content
    assert b'data-testid="approve"' in page
    assert b"Model loads" in page and b"1 rows scored" in page  # the gates' evidence
    for user in (manager, data_scientist):
        client.force_login(user)
        assert b'data-testid="approve"' not in client.get(url).content
    # The requester can cancel; htmx polls get the status fragment alone.
    fragment = client.get(url, HTTP_HX_REQUEST="true")
    assert fragment.status_code == 200
    assert fragment.content.lstrip().startswith(
        b'<div id="request-status" data-status="awaiting_review"'
    )
    assert b"Cancel request" in client.get(url).content


def test_review_queue_lists_pending_requests(client, world, reviewer):
    client.force_login(reviewer)
    response = client.get("/rollouts/requests/")
    assert [r.pk for r in response.context["queue"]] == [world["pending"].pk]


def test_missing_objects_are_404(client, world, manager):
    client.force_login(manager)
    for url in (
        "/registry/nope/",
        f"/registry/{MODEL}/versions/7/",
        "/rollouts/requests/999999/",
        "/monitoring/endpoints/nope/",
    ):
        assert client.get(url).status_code == 404, url


def test_audit_page_shows_events_and_filters(client, world, manager, reviewer):
    audit_record(actor=reviewer, action="test.looked", obj=world["v1"], after={"comment": "fine"})
    client.force_login(manager)
    response = client.get("/audit/", {"actor": "bob"})
    assert [e.action for e in response.context["page"]] == ["test.looked"]
    response = client.get("/audit/", {"action": "request.created"})
    assert response.context["page"].paginator.count == 2


def test_request_list_query_count_does_not_grow(
    client, world, data_scientist, manager, django_assert_max_num_queries
):
    staging = Environment.objects.get(name="staging")
    for n in range(3, 13):
        mv = ModelVersion.objects.create(
            registered_model=world["v1"].registered_model,
            version=n,
            status="READY",
            synced_at=timezone.now(),
        )
        services.deployment_request_create(
            requester=data_scientist, model_version=mv, environment=staging, justification="more"
        )
    client.force_login(manager)
    with django_assert_max_num_queries(12):
        response = client.get("/rollouts/requests/")
    assert len(response.context["requests"]) == 12


def test_dashboard_loads_plotly_from_our_static_files(client, world, manager):
    client.force_login(manager)
    page = client.get(f"/monitoring/endpoints/{world['endpoint'].name}/")
    assert page.status_code == 200
    assert b'<script src="/static/vendor/plotly.min.js"></script>' in page.content
    assert b'id="figures"' in page.content

    client.logout()  # static files need no login
    response = client.get("/static/vendor/plotly.min.js")
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert len(body) > 1_000_000
    assert b"plotly.js" in body[:2000]

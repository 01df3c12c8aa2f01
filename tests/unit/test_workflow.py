"""The request -> review -> deploy workflow: services directly, and the same transitions through
the HTML views and the REST API (status codes and what changed in the database)."""

from __future__ import annotations

import re

import mlflow
import pytest
from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone
from django.utils.text import slugify

from portal.models import AuditEvent
from registry.models import ModelVersion, RegisteredModel
from rollouts import services, tasks
from rollouts.models import Deployment, DeploymentRequest, Endpoint, Environment, Review
from tests.conftest import REGISTERED_MODEL
from tests.factories import UserFactory

Status = DeploymentRequest.Status
HEX64 = re.compile(r"[0-9a-f]{64}")


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Personas are created with a password; the production hasher costs ~0.5 s per user."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def _no_mlflow_aliases(mlflow_store):
    """The MLflow store lives for the whole session: drop aliases earlier tests moved, so each
    test starts from a registry where no environment alias is set."""
    client = mlflow.MlflowClient(settings.MLFLOW_TRACKING_URI)
    for alias in list(client.get_registered_model(REGISTERED_MODEL).aliases):
        client.delete_registered_model_alias(REGISTERED_MODEL, alias)


@pytest.fixture
def synced(_no_mlflow_aliases, synced):
    return synced


@pytest.fixture
def staging(db):
    return Environment.objects.get(name="staging")


@pytest.fixture
def scientist_reviewer(db):
    """A data scientist who is also a reviewer and a superuser: still never approves their own
    request."""
    return UserFactory(
        username="zoe", roles=["data scientists", "reviewers"], is_staff=True, is_superuser=True
    )


def _request(requester, mv, environment, justification="better recall on the holdout"):
    return services.deployment_request_create(
        requester=requester, model_version=mv, environment=environment, justification=justification
    )


def _deploy(requester, reviewer, mv, environment, capture):
    """Request, approve and (on commit, eagerly) execute; returns the refreshed request."""
    req = _request(requester, mv, environment)
    with capture(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer, comment="ok")
    req.refresh_from_db()
    return req


def _mlflow_alias_version(alias: str) -> int:
    client = mlflow.MlflowClient(settings.MLFLOW_TRACKING_URI)
    return int(client.get_model_version_by_alias(REGISTERED_MODEL, alias).version)


def _live_weights(endpoint) -> dict[int, int]:
    return {
        d.model_version.version: d.traffic_weight
        for d in endpoint.deployments.filter(status=Deployment.Status.LIVE)
    }


# --- create -----------------------------------------------------------------------------------


@pytest.mark.parametrize("persona", ["reviewer", "manager", "platform_admin", "outsider"])
def test_only_data_scientists_can_request(request, persona, synced, staging):
    user = request.getfixturevalue(persona)
    with pytest.raises(PermissionDenied):
        _request(user, synced[0], staging)
    assert not DeploymentRequest.objects.exists()
    assert not AuditEvent.objects.filter(action="request.created").exists()


def test_create_opens_request_awaiting_review(data_scientist, synced, staging):
    req = _request(data_scientist, synced[0], staging, justification="  first release  ")
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert req.justification == "first release"
    assert req.endpoint.name == f"{REGISTERED_MODEL}-staging"
    assert req.endpoint.environment == staging
    assert AuditEvent.objects.filter(action="request.created", object_id=str(req.pk)).count() == 1


@pytest.mark.parametrize("justification", ["", "   \n "])
def test_create_needs_justification(data_scientist, synced, staging, justification):
    with pytest.raises(ValidationError) as exc:
        _request(data_scientist, synced[0], staging, justification=justification)
    assert "justification" in exc.value.message_dict
    assert not DeploymentRequest.objects.exists()


def test_duplicate_open_request_is_refused(
    data_scientist, other_data_scientist, reviewer, synced, staging
):
    first = _request(data_scientist, synced[0], staging)
    with pytest.raises(ValidationError) as exc:
        _request(other_data_scientist, synced[0], staging)
    assert f"#{first.pk}" in str(exc.value.message_dict["model_version"])
    assert DeploymentRequest.objects.count() == 1
    # Once the first one is decided, the version can be requested again.
    services.deployment_request_reject(request_id=first.pk, reviewer=reviewer, comment="no")
    second = _request(other_data_scientist, synced[0], staging)
    assert second.status == Status.AWAITING_REVIEW
    assert DeploymentRequest.objects.count() == 2


def test_version_not_ready_in_mlflow_cannot_be_requested(data_scientist, synced, staging):
    v1, _ = synced
    v1.status = "PENDING_REGISTRATION"
    v1.save(update_fields=["status"])
    with pytest.raises(ValidationError) as exc:
        _request(data_scientist, v1, staging)
    assert "PENDING_REGISTRATION" in str(exc.value.message_dict["model_version"])
    assert not DeploymentRequest.objects.exists()


def test_look_alike_model_names_get_distinct_endpoints(client, data_scientist):
    """Model names are free text; endpoint names are unique slugs. Names that slugify alike
    (or to nothing, or past the column's 100 characters) must not end in a 500."""
    names = ["churn model", "churn-model", "模型一", "模型二", "x" * 200]
    for name in names:
        model = RegisteredModel.objects.create(name=name, synced_at=timezone.now())
        ModelVersion.objects.create(
            registered_model=model, version=1, status="READY", synced_at=timezone.now()
        )
    client.force_login(data_scientist)
    for name in names:
        response = client.post(
            "/api/requests",
            {"model": name, "version": 1, "environment": "staging", "justification": "j"},
            content_type="application/json",
        )
        assert response.status_code == 201, (name, response.content)
    endpoints = list(Endpoint.objects.values_list("name", flat=True))
    assert len(set(endpoints)) == len(names)
    assert "churn-model-staging" in endpoints and "churn-model-staging-2" in endpoints
    assert all(0 < len(name) <= 100 and slugify(name) == name for name in endpoints)
    # Asking again for the same model and environment reuses its endpoint.
    again = services.endpoint_for(
        model_version=ModelVersion.objects.get(registered_model__name="churn-model"),
        environment=Environment.objects.get(name="staging"),
    )
    assert again.name == "churn-model-staging-2"


def test_create_via_api_and_html(client, data_scientist, synced, staging):
    client.force_login(data_scientist)
    response = client.post(
        "/api/requests",
        {"model": REGISTERED_MODEL, "version": 1, "environment": "staging", "justification": "why"},
        content_type="application/json",
    )
    assert response.status_code == 201, response.content
    assert response.json()["status"] == Status.AWAITING_REVIEW
    # The same version again: 400 from the API and from the form, nothing new stored.
    response = client.post(
        "/api/requests",
        {"model": REGISTERED_MODEL, "version": 1, "environment": "staging", "justification": "why"},
        content_type="application/json",
    )
    assert response.status_code == 400
    response = client.post(
        f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
        {"environment": staging.pk, "strategy": "direct", "justification": "again"},
    )
    assert response.status_code == 400
    assert DeploymentRequest.objects.count() == 1
    response = client.post(
        f"/rollouts/requests/new/{REGISTERED_MODEL}/2/",
        {"environment": staging.pk, "strategy": "direct", "justification": "v2 please"},
    )
    assert response.status_code == 302
    created = DeploymentRequest.objects.get(model_version=synced[1])
    assert response["Location"] == created.get_absolute_url()


# --- approve and deploy -----------------------------------------------------------------------


def test_approve_takes_version_live(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    v1, _ = synced
    req = _deploy(data_scientist, reviewer, v1, staging, django_capture_on_commit_callbacks)

    assert req.status == Status.LIVE
    assert req.decided_at is not None and req.live_at is not None
    deployment = Deployment.objects.get(request=req)
    assert deployment.status == Deployment.Status.LIVE
    assert deployment.traffic_weight == 100
    assert deployment.model_version == v1
    assert HEX64.fullmatch(deployment.artifact_digest)
    assert deployment.live_at is not None
    assert Review.objects.get(request=req).reviewer == reviewer
    # The environment's alias follows the live version, in MLflow and in the mirror.
    assert _mlflow_alias_version("staging") == 1
    assert RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases == {"staging": 1}
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    assert actions[-6:] == [
        "request.created",
        "request.approved",
        "deployment.started",
        "deployment.live",
        "traffic.changed",
        "registry.alias_set",
    ]


def test_deploying_v2_retires_v1(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    v1, v2 = synced
    first = _deploy(data_scientist, reviewer, v1, staging, django_capture_on_commit_callbacks)
    second = _deploy(data_scientist, reviewer, v2, staging, django_capture_on_commit_callbacks)

    first.refresh_from_db()
    assert first.status == Status.SUPERSEDED
    assert f"#{second.pk}" in first.status_reason
    assert second.status == Status.LIVE
    old = Deployment.objects.get(request=first)
    assert (old.status, old.traffic_weight) == (Deployment.Status.RETIRED, 0)
    assert old.retired_at is not None
    assert _live_weights(second.endpoint) == {2: 100}
    assert _mlflow_alias_version("staging") == 2
    assert RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases == {"staging": 2}
    assert (
        AuditEvent.objects.filter(action="request.superseded", object_id=str(first.pk)).count() == 1
    )


def test_requester_never_approves_own_request(
    client, scientist_reviewer, synced, staging, django_capture_on_commit_callbacks
):
    req = _request(scientist_reviewer, synced[0], staging)
    with django_capture_on_commit_callbacks() as callbacks:
        with pytest.raises(services.SeparationOfDutiesError):
            services.deployment_request_approve(request_id=req.pk, reviewer=scientist_reviewer)
        with pytest.raises(services.SeparationOfDutiesError):
            services.deployment_request_reject(
                request_id=req.pk, reviewer=scientist_reviewer, comment="mine"
            )
        client.force_login(scientist_reviewer)
        assert client.post(f"/rollouts/requests/{req.pk}/approve").status_code == 403
        assert (
            client.post(f"/rollouts/requests/{req.pk}/reject", {"comment": "x"}).status_code == 403
        )
        response = client.post(
            f"/api/requests/{req.pk}/approve", {}, content_type="application/json"
        )
        assert response.status_code == 403
    assert callbacks == []
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert not Review.objects.exists()
    assert not AuditEvent.objects.filter(action="request.approved").exists()
    # The detail page offers no approve button to the requester.
    page = client.get(req.get_absolute_url())
    assert page.status_code == 200
    assert b'data-testid="approve"' not in page.content


def test_non_reviewer_cannot_approve(
    client, data_scientist, other_data_scientist, manager, synced, staging
):
    req = _request(data_scientist, synced[0], staging)
    for user in (other_data_scientist, manager):
        client.force_login(user)
        assert (
            client.post(
                f"/api/requests/{req.pk}/approve", {}, content_type="application/json"
            ).status_code
            == 403
        )
        assert client.post(f"/rollouts/requests/{req.pk}/approve").status_code == 403
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW


def test_outsider_cannot_see_or_decide(client, data_scientist, outsider, synced, staging):
    req = _request(data_scientist, synced[0], staging)
    client.force_login(outsider)
    assert client.get(req.get_absolute_url()).status_code == 404
    assert client.post(f"/rollouts/requests/{req.pk}/approve").status_code == 404
    assert (
        client.post(
            f"/api/requests/{req.pk}/approve", {}, content_type="application/json"
        ).status_code
        == 404
    )
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW


@pytest.mark.parametrize("decided", ["rejected", "approved"])
def test_approving_a_decided_request_is_a_conflict(
    client,
    data_scientist,
    reviewer,
    second_reviewer,
    synced,
    staging,
    decided,
    django_capture_on_commit_callbacks,
):
    req = _request(data_scientist, synced[0], staging)
    # Callbacks are captured and never run: an approved request stays approved, undeployed.
    with django_capture_on_commit_callbacks() as callbacks:
        if decided == "rejected":
            services.deployment_request_reject(request_id=req.pk, reviewer=reviewer, comment="no")
        else:
            services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
        client.force_login(second_reviewer)
        response = client.post(
            f"/api/requests/{req.pk}/approve", {}, content_type="application/json"
        )
        assert response.status_code == 409
        assert decided in response.json()["detail"]
        response = client.post(f"/rollouts/requests/{req.pk}/approve", {"comment": "late"})
        assert response.status_code == 409
        assert b'role="alert"' in response.content
        response = client.post(
            f"/api/requests/{req.pk}/reject", {"comment": "late"}, content_type="application/json"
        )
        assert response.status_code == 409
    # Only the winning approval launched a task; the losers launched nothing.
    assert len(callbacks) == (1 if decided == "approved" else 0)
    req.refresh_from_db()
    assert req.status == decided
    assert list(Review.objects.values_list("reviewer__username", flat=True)) == ["bob"]


def test_reject_requires_comment(client, data_scientist, reviewer, synced, staging):
    req = _request(data_scientist, synced[0], staging)
    with pytest.raises(ValidationError):
        services.deployment_request_reject(request_id=req.pk, reviewer=reviewer, comment="  ")
    client.force_login(reviewer)
    response = client.post(
        f"/api/requests/{req.pk}/reject", {"comment": ""}, content_type="application/json"
    )
    assert response.status_code == 400
    assert "comment" in response.json()
    assert (
        client.post(
            f"/api/requests/{req.pk}/reject", {}, content_type="application/json"
        ).status_code
        == 400
    )
    assert client.post(f"/rollouts/requests/{req.pk}/reject", {"comment": ""}).status_code == 400
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert not Review.objects.exists()

    response = client.post(f"/rollouts/requests/{req.pk}/reject", {"comment": "metrics regress"})
    assert response.status_code == 302
    req.refresh_from_db()
    assert (req.status, req.status_reason) == (Status.REJECTED, "metrics regress")
    assert Review.objects.get().decision == Review.Decision.REJECT


# --- cancel -----------------------------------------------------------------------------------


def test_only_the_requester_cancels(
    client, data_scientist, other_data_scientist, reviewer, synced, staging
):
    req = _request(data_scientist, synced[0], staging)
    for user in (other_data_scientist, reviewer):
        with pytest.raises(PermissionDenied):
            services.deployment_request_cancel(request_id=req.pk, actor=user)
        client.force_login(user)
        assert client.post(f"/api/requests/{req.pk}/cancel").status_code == 403
        assert client.post(f"/rollouts/requests/{req.pk}/cancel").status_code == 403
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW

    client.force_login(data_scientist)
    response = client.post(f"/api/requests/{req.pk}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == Status.CANCELLED
    req.refresh_from_db()
    assert req.status == Status.CANCELLED
    assert AuditEvent.objects.filter(action="request.cancelled", actor=data_scientist).count() == 1
    # A cancelled request cannot be cancelled or approved again.
    assert client.post(f"/rollouts/requests/{req.pk}/cancel").status_code == 409


def test_cancel_after_approval_before_launch_stops_the_deployment(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    req = _request(data_scientist, synced[0], staging)
    with django_capture_on_commit_callbacks() as callbacks:
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    for callback in callbacks:  # the task, sent on commit, finds the request cancelled
        callback()
    req.refresh_from_db()
    assert req.status == Status.CANCELLED
    assert not Deployment.objects.exists()


def test_cannot_cancel_once_deployed(
    client, data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    req = _deploy(data_scientist, reviewer, synced[0], staging, django_capture_on_commit_callbacks)
    assert req.status == Status.LIVE
    with pytest.raises(services.InvalidTransition):
        services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    client.force_login(data_scientist)
    assert client.post(f"/api/requests/{req.pk}/cancel").status_code == 409
    req.refresh_from_db()
    assert req.status == Status.LIVE
    assert Deployment.objects.get(request=req).traffic_weight == 100


# --- the Celery task ---------------------------------------------------------------------------


def test_task_is_sent_only_on_commit(
    monkeypatch, data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    sent: list[int] = []
    monkeypatch.setattr(
        tasks.execute_deployment, "delay", lambda request_id: sent.append(request_id)
    )
    req = _request(data_scientist, synced[0], staging)
    with django_capture_on_commit_callbacks() as callbacks:
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
        assert sent == []  # not inside the open transaction
    assert len(callbacks) == 1
    assert sent == []
    req.refresh_from_db()
    assert req.status == Status.APPROVED
    assert not Deployment.objects.exists()
    callbacks[0]()
    assert sent == [req.pk]  # an id, never a model instance


def test_reject_and_cancel_send_no_task(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    v1, v2 = synced
    a, b = _request(data_scientist, v1, staging), _request(data_scientist, v2, staging)
    with django_capture_on_commit_callbacks() as callbacks:
        services.deployment_request_reject(request_id=a.pk, reviewer=reviewer, comment="no")
        services.deployment_request_cancel(request_id=b.pk, actor=data_scientist)
    assert callbacks == []


def test_execute_twice_converges(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    req = _deploy(data_scientist, reviewer, synced[0], staging, django_capture_on_commit_callbacks)
    deployment = Deployment.objects.get(request=req)
    events = AuditEvent.objects.count()

    again = services.deployment_execute(request_id=req.pk)
    assert tasks.execute_deployment.apply(args=[req.pk]).get() == Status.LIVE

    assert again.status == Status.LIVE
    assert Deployment.objects.filter(request=req).count() == 1
    assert Deployment.objects.get(request=req).artifact_digest == deployment.artifact_digest
    assert _live_weights(req.endpoint) == {1: 100}
    assert AuditEvent.objects.count() == events


def test_execute_resumes_after_worker_died_mid_way(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    """A worker that died after marking the request deploying: the redelivered task finishes."""
    req = _request(data_scientist, synced[0], staging)
    with django_capture_on_commit_callbacks():
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    services._deployment_begin(req.pk)
    req.refresh_from_db()
    assert req.status == Status.DEPLOYING
    with pytest.raises(services.InvalidTransition):  # too late to cancel
        services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)

    assert tasks.execute_deployment.apply(args=[req.pk]).get() == Status.LIVE
    assert Deployment.objects.filter(request=req).count() == 1
    assert _live_weights(req.endpoint) == {1: 100}
    assert AuditEvent.objects.filter(action="deployment.started").count() == 1
    assert AuditEvent.objects.filter(action="deployment.live").count() == 1


def test_task_for_a_missing_request_does_nothing(db):
    assert tasks.execute_deployment.apply(args=[987654]).get() is None
    assert not Deployment.objects.exists()


# --- smoke-test failures ------------------------------------------------------------------------


def test_failed_smoke_test_keeps_previous_version_live(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    v1, v2 = synced
    live = _deploy(data_scientist, reviewer, v1, staging, django_capture_on_commit_callbacks)
    # v2's input example no longer matches its signature: one column renamed.
    example = v2.input_example
    example["dataframe_split"]["columns"][0] = "not a feature"
    v2.input_example = example
    v2.save(update_fields=["input_example"])

    failed = _deploy(data_scientist, reviewer, v2, staging, django_capture_on_commit_callbacks)

    assert failed.status == Status.FAILED
    assert "signature" in failed.status_reason and "not a feature" in failed.status_reason
    bad = Deployment.objects.get(request=failed)
    assert (bad.status, bad.traffic_weight) == (Deployment.Status.FAILED, 0)
    assert bad.failure_reason == failed.status_reason
    live.refresh_from_db()
    assert live.status == Status.LIVE
    assert _live_weights(live.endpoint) == {1: 100}
    assert _mlflow_alias_version("staging") == 1
    assert RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases == {"staging": 1}
    assert (
        AuditEvent.objects.filter(action="deployment.failed", object_id=str(failed.pk)).count() == 1
    )


def test_model_that_cannot_score_its_example_fails(
    data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    v1, _ = synced
    columns = v1.input_example["dataframe_split"]["columns"]
    v1.input_example = {"dataframe_split": {"columns": columns, "data": [[None] * len(columns)]}}
    v1.save(update_fields=["input_example"])

    req = _deploy(data_scientist, reviewer, v1, staging, django_capture_on_commit_callbacks)

    assert req.status == Status.FAILED
    assert "predict raised" in req.status_reason
    assert not Deployment.objects.filter(status=Deployment.Status.LIVE).exists()
    assert "staging" not in RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases

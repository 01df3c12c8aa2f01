"""The request -> review -> deploy workflow: services directly, and the same transitions through
the HTML views and the REST API (status codes and what changed in the database)."""

from __future__ import annotations

import re
from datetime import timedelta

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


@pytest.fixture
def staging(db):
    return Environment.objects.get(name="staging")


@pytest.fixture
def teammate(team):
    """Another data scientist of ``team``: sees alice's requests but may not decide them."""
    user = UserFactory(username="grace", roles=["data scientists"])
    team.members.add(user)
    return user


@pytest.fixture
def scientist_reviewer(team):
    """A data scientist of ``team`` who is also a reviewer and a superuser: still never approves
    their own request."""
    user = UserFactory(
        username="zoe", roles=["data scientists", "reviewers"], is_staff=True, is_superuser=True
    )
    team.members.add(user)
    return user


@pytest.fixture
def lenient_staging(staging):
    """v2 (random forest) scores below v1 (logistic regression) on the held-out split, so the
    metrics gate would stop it replacing v1. These tests are about replacing a live version,
    not about that gate (see test_gates.py): let staging accept any metric drop."""
    staging.metric_tolerance = 1.0
    staging.save(update_fields=["metric_tolerance"])
    return staging


def _request(requester, mv, environment, justification="better recall on the holdout"):
    """Open a request; its gates run only when the on-commit callbacks do."""
    return services.deployment_request_create(
        requester=requester, model_version=mv, environment=environment, justification=justification
    )


def _mlflow_alias_version(alias: str) -> int:
    client = mlflow.MlflowClient(settings.MLFLOW_TRACKING_URI)
    return int(client.get_model_version_by_alias(REGISTERED_MODEL, alias).version)


def _live_weights(endpoint) -> dict[int, int]:
    return {
        d.model_version.version: d.traffic_weight
        for d in endpoint.deployments.filter(status=Deployment.Status.LIVE)
    }


def _actions(req) -> list[str]:
    return list(
        AuditEvent.objects.filter(object_type="rollouts.DeploymentRequest", object_id=str(req.pk))
        .order_by("id")
        .values_list("action", flat=True)
    )


def _record_tasks(monkeypatch) -> list[tuple]:
    """Replace the ``delay`` of every rollouts task by a recorder; returns what was sent."""
    sent: list[tuple] = []
    for name in ("run_gates", "execute_deployment", "send_request_notification"):
        monkeypatch.setattr(
            getattr(tasks, name), "delay", lambda *args, _name=name: sent.append((_name, *args))
        )
    return sent


# --- create -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "persona", ["reviewer", "manager", "platform_admin", "outsider", "other_data_scientist"]
)
def test_only_data_scientists_of_the_team_can_request(request, persona, synced, staging):
    user = request.getfixturevalue(persona)
    with pytest.raises(PermissionDenied):
        _request(user, synced[0], staging)
    assert not DeploymentRequest.objects.exists()
    assert not AuditEvent.objects.filter(action="request.created").exists()


def test_create_opens_request_whose_gates_run_on_commit(
    data_scientist, synced, staging, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        req = _request(data_scientist, synced[0], staging, justification="  first release  ")
    req.refresh_from_db()
    assert req.status == Status.PENDING_GATES
    assert not req.gate_results.exists()
    assert req.justification == "first release"
    assert req.endpoint.name == f"{REGISTERED_MODEL}-staging"
    assert req.endpoint.environment == staging
    assert req.expires_at is not None and req.expires_at > timezone.now()
    assert _actions(req) == ["request.created"]

    assert len(callbacks) == 1  # the gates task, sent once the request is committed
    callbacks[0]()
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert HEX64.fullmatch(req.artifact_digest)
    gates = list(req.gate_results.all())
    assert [g.name for g in gates] == list(staging.gates)
    assert all(g.passed and g.artifact_digest == req.artifact_digest for g in gates)
    assert _actions(req) == ["request.created", "request.gates_passed"]


@pytest.mark.parametrize("justification", ["", "   \n "])
def test_create_needs_justification(data_scientist, synced, staging, justification):
    with pytest.raises(ValidationError) as exc:
        _request(data_scientist, synced[0], staging, justification=justification)
    assert "justification" in exc.value.message_dict
    assert not DeploymentRequest.objects.exists()


def test_duplicate_open_request_is_refused(
    data_scientist, teammate, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        first = _request(data_scientist, synced[0], staging)
    # Refused while the first request's gates are pending...
    with pytest.raises(ValidationError) as exc:
        _request(teammate, synced[0], staging)
    assert f"#{first.pk}" in str(exc.value.message_dict["model_version"])
    # ... and while it awaits review.
    for callback in callbacks:
        callback()
    first.refresh_from_db()
    assert first.status == Status.AWAITING_REVIEW
    with pytest.raises(ValidationError) as exc:
        _request(teammate, synced[0], staging)
    assert f"#{first.pk}" in str(exc.value.message_dict["model_version"])
    assert DeploymentRequest.objects.count() == 1
    # Once the first one is decided, the version can be requested again.
    services.deployment_request_reject(request_id=first.pk, reviewer=reviewer, comment="no")
    second = _request(teammate, synced[0], staging)
    assert second.status == Status.PENDING_GATES
    assert DeploymentRequest.objects.count() == 2


def test_version_not_ready_in_mlflow_cannot_be_requested(data_scientist, synced, staging):
    v1, _ = synced
    v1.status = "PENDING_REGISTRATION"
    v1.save(update_fields=["status"])
    with pytest.raises(ValidationError) as exc:
        _request(data_scientist, v1, staging)
    assert "PENDING_REGISTRATION" in str(exc.value.message_dict["model_version"])
    assert not DeploymentRequest.objects.exists()


def test_look_alike_model_names_get_distinct_endpoints(client, data_scientist, team):
    """Model names are free text; endpoint names are unique slugs. Names that slugify alike
    (or to nothing, or past the column's 100 characters) must not end in a 500."""
    names = ["churn model", "churn-model", "模型一", "模型二", "x" * 200]
    for name in names:
        model = RegisteredModel.objects.create(name=name, team=team, synced_at=timezone.now())
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


def test_create_via_api_and_html(
    client,
    data_scientist,
    other_data_scientist,
    synced,
    staging,
    django_capture_on_commit_callbacks,
):
    client.force_login(data_scientist)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/requests",
            {
                "model": REGISTERED_MODEL,
                "version": 1,
                "environment": "staging",
                "justification": "why",
            },
            content_type="application/json",
        )
        assert response.status_code == 201, response.content
        # The response is written before the commit: the gates have not run yet.
        assert response.json()["status"] == Status.PENDING_GATES
    assert DeploymentRequest.objects.get(pk=response.json()["id"]).status == Status.AWAITING_REVIEW
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
    assert created.status == Status.PENDING_GATES
    # Another team's data scientist finds no such version to request.
    client.force_login(other_data_scientist)
    url = f"/rollouts/requests/new/{REGISTERED_MODEL}/2/"
    assert client.get(url).status_code == 404
    assert client.post(url, {"environment": staging.pk, "justification": "mine"}).status_code == 404
    assert DeploymentRequest.objects.count() == 2


# --- approve and deploy -----------------------------------------------------------------------


def test_approve_takes_version_live(deploy, reviewer, synced):
    v1, _ = synced
    req = deploy(v1, "staging")

    assert req.status == Status.LIVE
    assert req.decided_at is not None and req.live_at is not None
    deployment = Deployment.objects.get(request=req)
    assert deployment.status == Deployment.Status.LIVE
    assert deployment.traffic_weight == 100
    assert deployment.model_version == v1
    assert HEX64.fullmatch(deployment.artifact_digest)
    assert deployment.artifact_digest == req.artifact_digest  # what the gates checked
    assert deployment.live_at is not None
    assert Review.objects.get(request=req).reviewer == reviewer
    # The environment's alias follows the live version, in MLflow and in the mirror.
    assert _mlflow_alias_version("staging") == 1
    assert RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases == {"staging": 1}
    actions = list(AuditEvent.objects.order_by("id").values_list("action", flat=True))
    assert actions[-7:] == [
        "request.created",
        "request.gates_passed",
        "request.approved",
        "deployment.started",
        "deployment.live",
        "traffic.changed",
        "registry.alias_set",
    ]


def test_deploying_v2_retires_v1(deploy, synced, lenient_staging):
    v1, v2 = synced
    first = deploy(v1, "staging")
    second = deploy(v2, "staging")

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
    with django_capture_on_commit_callbacks(execute=True):
        req = _request(scientist_reviewer, synced[0], staging)
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
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
    client, awaiting_review, teammate, other_data_scientist, manager, synced
):
    req = awaiting_review(synced[0])
    # A teammate of the requester and a manager see the request but may not decide it.
    for user in (teammate, manager):
        client.force_login(user)
        assert client.get(req.get_absolute_url()).status_code == 200
        assert (
            client.post(
                f"/api/requests/{req.pk}/approve", {}, content_type="application/json"
            ).status_code
            == 403
        )
        assert client.post(f"/rollouts/requests/{req.pk}/approve").status_code == 403
    # For another team's data scientist the request does not exist.
    client.force_login(other_data_scientist)
    assert (
        client.post(
            f"/api/requests/{req.pk}/approve", {}, content_type="application/json"
        ).status_code
        == 404
    )
    assert client.post(f"/rollouts/requests/{req.pk}/approve").status_code == 404
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert not Review.objects.exists()


@pytest.mark.parametrize("persona", ["outsider", "other_data_scientist"])
def test_outsiders_and_other_teams_cannot_see_or_decide(
    request, client, awaiting_review, reviewer, manager, synced, persona
):
    req = awaiting_review(synced[0])
    client.force_login(request.getfixturevalue(persona))
    assert client.get(req.get_absolute_url()).status_code == 404
    assert client.get(req.get_absolute_url(), HTTP_HX_REQUEST="true").status_code == 404
    for action in ("approve", "reject", "cancel", "comment"):
        assert (
            client.post(
                f"/rollouts/requests/{req.pk}/{action}", {"comment": "x", "body": "x"}
            ).status_code
            == 404
        ), action
    assert client.get(f"/api/requests/{req.pk}").status_code == 404
    for action in ("approve", "reject", "cancel"):
        response = client.post(
            f"/api/requests/{req.pk}/{action}", {"comment": "x"}, content_type="application/json"
        )
        assert response.status_code == 404, action
    assert list(client.get("/rollouts/requests/").context["requests"]) == []
    assert client.get("/api/requests").json() == []
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert not req.comments.exists()
    # Reviewers and managers see every team's requests.
    for user in (reviewer, manager):
        client.force_login(user)
        assert client.get(req.get_absolute_url()).status_code == 200
        assert [r["id"] for r in client.get("/api/requests").json()] == [req.pk]


@pytest.mark.parametrize("decided", ["rejected", "approved"])
def test_approving_a_decided_request_is_a_conflict(
    client,
    monkeypatch,
    awaiting_review,
    reviewer,
    second_reviewer,
    synced,
    decided,
    django_capture_on_commit_callbacks,
):
    req = awaiting_review(synced[0])
    sent = _record_tasks(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True):
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
    # Only the winning decision sent anything: the approval launched the deployment (an id,
    # not an instance), and the requester hears of the decision once.
    launched = [("execute_deployment", req.pk)] if decided == "approved" else []
    assert sorted(sent) == sorted([*launched, ("send_request_notification", req.pk, decided)])
    req.refresh_from_db()
    assert req.status == decided
    assert list(Review.objects.values_list("reviewer__username", flat=True)) == ["bob"]


def test_reject_requires_comment(client, awaiting_review, reviewer, synced):
    req = awaiting_review(synced[0])
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
    client, awaiting_review, data_scientist, teammate, other_data_scientist, reviewer, synced
):
    req = awaiting_review(synced[0])
    for user in (teammate, reviewer, other_data_scientist):
        with pytest.raises(PermissionDenied):
            services.deployment_request_cancel(request_id=req.pk, actor=user)
        # Another team's data scientist does not even see the request.
        refused = 404 if user == other_data_scientist else 403
        client.force_login(user)
        assert client.post(f"/api/requests/{req.pk}/cancel").status_code == refused
        assert client.post(f"/rollouts/requests/{req.pk}/cancel").status_code == refused
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


def test_cancel_before_the_gates_ran_stops_them(
    data_scientist, synced, staging, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        req = _request(data_scientist, synced[0], staging)
    services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    for callback in callbacks:  # the gates task, sent on commit, finds the request cancelled
        callback()
    req.refresh_from_db()
    assert req.status == Status.CANCELLED
    assert not req.gate_results.exists()
    assert _actions(req) == ["request.created", "request.cancelled"]


def test_cancel_after_approval_before_launch_stops_the_deployment(
    awaiting_review, data_scientist, reviewer, synced, django_capture_on_commit_callbacks
):
    req = awaiting_review(synced[0])
    with django_capture_on_commit_callbacks() as callbacks:
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    for callback in callbacks:  # the task, sent on commit, finds the request cancelled
        callback()
    req.refresh_from_db()
    assert req.status == Status.CANCELLED
    assert not Deployment.objects.exists()


def test_cannot_cancel_once_deployed(client, deploy, data_scientist, synced):
    req = deploy(synced[0], "staging")
    assert req.status == Status.LIVE
    with pytest.raises(services.InvalidTransition):
        services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    client.force_login(data_scientist)
    assert client.post(f"/api/requests/{req.pk}/cancel").status_code == 409
    req.refresh_from_db()
    assert req.status == Status.LIVE
    assert Deployment.objects.get(request=req).traffic_weight == 100


# --- the Celery tasks --------------------------------------------------------------------------


def test_tasks_are_sent_only_on_commit(
    monkeypatch, data_scientist, reviewer, synced, staging, django_capture_on_commit_callbacks
):
    sent = _record_tasks(monkeypatch)
    with django_capture_on_commit_callbacks() as callbacks:
        req = _request(data_scientist, synced[0], staging)
        assert sent == []  # not inside the open transaction
    assert len(callbacks) == 1
    assert sent == []
    callbacks[0]()
    assert sent == [("run_gates", req.pk)]  # an id, never a model instance
    services.deployment_request_run_gates(request_id=req.pk)  # what the task does
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW

    sent.clear()
    with django_capture_on_commit_callbacks() as callbacks:
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
        assert sent == []
    assert len(callbacks) == 2
    assert sent == []
    req.refresh_from_db()
    assert req.status == Status.APPROVED
    assert not Deployment.objects.exists()
    for callback in callbacks:
        callback()
    assert sorted(sent) == [
        ("execute_deployment", req.pk),
        ("send_request_notification", req.pk, "approved"),
    ]


def test_reject_and_cancel_launch_nothing(
    monkeypatch,
    awaiting_review,
    data_scientist,
    reviewer,
    synced,
    django_capture_on_commit_callbacks,
):
    v1, v2 = synced
    a, b = awaiting_review(v1), awaiting_review(v2)
    sent = _record_tasks(monkeypatch)
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_reject(request_id=a.pk, reviewer=reviewer, comment="no")
        services.deployment_request_cancel(request_id=b.pk, actor=data_scientist)
    # No gates, no deployment; only the requester of the rejected request hears why.
    assert sent == [("send_request_notification", a.pk, "rejected")]
    assert not Deployment.objects.exists()


def test_execute_twice_converges(deploy, synced):
    req = deploy(synced[0], "staging")
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
    awaiting_review, data_scientist, reviewer, synced, django_capture_on_commit_callbacks
):
    """A worker that died after marking the request deploying: once its lease lapsed, the
    redelivered task finishes."""
    req = awaiting_review(synced[0])
    with django_capture_on_commit_callbacks():
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    services._deployment_begin(req.pk)
    req.refresh_from_db()
    assert req.status == Status.DEPLOYING
    DeploymentRequest.objects.filter(pk=req.pk).update(
        deploy_lease_until=timezone.now() - timedelta(seconds=1)
    )

    assert tasks.execute_deployment.apply(args=[req.pk]).get() == Status.LIVE
    assert Deployment.objects.filter(request=req).count() == 1
    assert _live_weights(req.endpoint) == {1: 100}
    assert AuditEvent.objects.filter(action="deployment.started").count() == 1
    assert AuditEvent.objects.filter(action="deployment.live").count() == 1


def test_tasks_for_a_missing_request_do_nothing(db):
    assert tasks.run_gates.apply(args=[987654]).get() is None
    assert tasks.execute_deployment.apply(args=[987654]).get() is None
    assert not Deployment.objects.exists()


# --- smoke-test failures at launch ---------------------------------------------------------------
# The gates already load the version and score its input example at request time; the launch
# smoke-tests again, so that what changed between review and launch cannot go live.


def test_failed_smoke_test_keeps_previous_version_live(
    deploy, awaiting_review, reviewer, synced, lenient_staging, django_capture_on_commit_callbacks
):
    v1, v2 = synced
    live = deploy(v1, "staging")
    pending = awaiting_review(v2)
    assert pending.status == Status.AWAITING_REVIEW
    # After its gates passed, v2's input example no longer matches its signature: one column
    # renamed.
    example = v2.input_example
    example["dataframe_split"]["columns"][0] = "not a feature"
    v2.input_example = example
    v2.save(update_fields=["input_example"])

    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=pending.pk, reviewer=reviewer)
    failed = DeploymentRequest.objects.get(pk=pending.pk)

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
    awaiting_review, reviewer, synced, django_capture_on_commit_callbacks
):
    v1, _ = synced
    req = awaiting_review(v1)
    assert req.status == Status.AWAITING_REVIEW
    columns = v1.input_example["dataframe_split"]["columns"]
    v1.input_example = {"dataframe_split": {"columns": columns, "data": [[None] * len(columns)]}}
    v1.save(update_fields=["input_example"])

    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    req.refresh_from_db()

    assert req.status == Status.FAILED
    assert "predict raised" in req.status_reason
    assert not Deployment.objects.filter(status=Deployment.Status.LIVE).exists()
    assert "staging" not in RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases


# --- a broker that is down ---------------------------------------------------------------------


def test_a_broker_outage_neither_fails_the_request_nor_loses_its_gates(
    synced, data_scientist, monkeypatch, django_capture_on_commit_callbacks
):
    from kombu.exceptions import OperationalError

    v1, _ = synced
    real_delay = tasks.run_gates.delay

    def broker_down(*args):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(tasks.run_gates, "delay", broker_down)
    with django_capture_on_commit_callbacks(execute=True):
        req = services.deployment_request_create(
            requester=data_scientist,
            model_version=v1,
            environment=Environment.objects.get(name="staging"),
            justification="broker outage",
        )
    req.refresh_from_db()
    assert req.status == "pending_gates"  # kept, though its task could not be queued

    monkeypatch.setattr(tasks.run_gates, "delay", real_delay)
    assert services.deployment_requests_redispatch() == []  # too recent to call stuck
    assert services.deployment_requests_redispatch(older_than=timedelta(0)) == [req.pk]
    req.refresh_from_db()
    assert req.status == "awaiting_review"

"""Governance of deployment requests (issue 3): the transition table, N distinct approvals,
separation of duties, approver groups, the promotion path, freeze windows, expiry,
cancellation, resubmission, comments, notifications, team scoping and rollback.

Each test drives the services or the HTML views and checks the status code, what changed in the
database and the audit events written.
"""

from __future__ import annotations

from datetime import timedelta

import mlflow
import pytest
from django.conf import settings
from django.contrib.auth.models import Group
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from portal.audit import audit_verify
from portal.models import AuditEvent
from rollouts import selectors, services
from rollouts.models import (
    Comment,
    Deployment,
    DeploymentRequest,
    Environment,
    FreezeWindow,
    Review,
    TrafficHistory,
)
from tests.conftest import REGISTERED_MODEL
from tests.factories import UserFactory

Status = DeploymentRequest.Status
TRANSITIONS = DeploymentRequest.TRANSITIONS


@pytest.fixture
def staging(db):
    return Environment.objects.get(name="staging")


@pytest.fixture
def production(db):
    return Environment.objects.get(name="production")


@pytest.fixture
def scientist_reviewer(team):
    """A data scientist of the team who is also a reviewer, staff and superuser."""
    user = UserFactory(
        username="zoe", roles=["data scientists", "reviewers"], is_staff=True, is_superuser=True
    )
    team.members.add(user)
    return user


@pytest.fixture
def teammate(team):
    """Another data scientist of the same team as ``data_scientist``."""
    user = UserFactory(username="grace", roles=["data scientists"])
    team.members.add(user)
    return user


def _events(req: DeploymentRequest, action: str | None = None):
    events = AuditEvent.objects.filter(
        object_type="rollouts.DeploymentRequest", object_id=str(req.pk)
    )
    return events.filter(action=action) if action else events


def _request(requester, mv, env_name: str = "staging") -> DeploymentRequest:
    """A saved request without running its gates (for state-machine tests)."""
    env = Environment.objects.get(name=env_name)
    return DeploymentRequest.objects.create(
        model_version=mv,
        endpoint=services.endpoint_for(model_version=mv, environment=env),
        requester=requester,
        justification="state machine",
    )


def _post(client, user, url: str, data: dict | None = None):
    client.force_login(user)
    return client.post(url, data or {})


def _url(req: DeploymentRequest, action: str = "") -> str:
    return f"/rollouts/requests/{req.pk}/{action}"


# --- 3. the transition table -------------------------------------------------------------


def test_transition_table_covers_every_status():
    assert set(TRANSITIONS) == set(Status.values)
    for targets in TRANSITIONS.values():
        assert targets <= set(Status.values)


def test_every_pair_outside_the_table_is_refused(synced, data_scientist):
    v1, _ = synced
    req = _request(data_scientist, v1)
    refused = 0
    for old in Status.values:
        for new in Status.values:
            if new in TRANSITIONS[old]:
                continue
            DeploymentRequest.objects.filter(pk=req.pk).update(status=old, status_reason="")
            req.refresh_from_db()
            with pytest.raises(services.InvalidTransition):
                services._transition(req, new, reason="should not stick")
            req.refresh_from_db()
            assert (req.status, req.status_reason) == (old, ""), (old, new)
            refused += 1
    allowed = sum(len(t) for t in TRANSITIONS.values())
    assert refused == len(Status.values) ** 2 - allowed


def test_every_pair_in_the_table_is_allowed(synced, data_scientist):
    v1, _ = synced
    req = _request(data_scientist, v1)
    for old, targets in TRANSITIONS.items():
        for new in targets:
            DeploymentRequest.objects.filter(pk=req.pk).update(status=old)
            req.refresh_from_db()
            assert services._transition(req, new, reason="r") == old
            req.refresh_from_db()
            assert req.status == new


def test_terminal_states_have_no_exit_except_rollback_restore():
    for status in DeploymentRequest.TERMINAL:
        expected = {Status.LIVE} if status == Status.SUPERSEDED else set()
        assert TRANSITIONS[status] == expected, status
    assert TRANSITIONS[Status.LIVE] == {Status.SUPERSEDED, Status.ROLLED_BACK}


def test_happy_path_follows_the_table(synced, deploy):
    v1, _ = synced
    req = deploy(v1, "staging")
    assert req.status == Status.LIVE and req.decided_at and req.live_at
    statuses = [
        (e.before or {}).get("status", "") + ">" + (e.after or {}).get("status", "")
        for e in _events(req).order_by("id")
        if (e.after or {}).get("status")
    ]
    assert statuses == [
        ">pending_gates",
        "pending_gates>awaiting_review",
        "awaiting_review>approved",
        "approved>deploying",
        "deploying>live",
    ]


# --- 4. N distinct approvals and separation of duties --------------------------------------


def test_production_needs_two_distinct_approvals(
    synced,
    deploy,
    awaiting_review,
    reviewer,
    second_reviewer,
    client,
    django_capture_on_commit_callbacks,
):
    v1, _ = synced
    deploy(v1, "staging")
    req = awaiting_review(v1, "production")
    assert req.status == Status.AWAITING_REVIEW, req.status_reason

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        services.deployment_request_approve(
            request_id=req.pk, reviewer=reviewer, comment="first look"
        )
    assert callbacks == []  # nothing launched after one approval
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    recorded = _events(req, "request.approval_recorded").get()
    assert recorded.actor == reviewer
    assert recorded.after["approvals"] == 1 and recorded.after["required"] == 2
    assert not Deployment.objects.filter(request=req).exists()

    # One person counts once, also through the page.
    with pytest.raises(services.Conflict, match="one person counts once"):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    response = _post(client, reviewer, _url(req, "approve"), {"comment": "again"})
    assert response.status_code == 409
    assert Review.objects.filter(request=req).count() == 1
    assert _events(req, "request.approval_recorded").count() == 1

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _post(client, second_reviewer, _url(req, "approve"), {"comment": "second look"})
    assert response.status_code == 302
    assert len(callbacks) >= 1  # the deployment (and e-mails) are sent only after commit
    req.refresh_from_db()
    assert req.status == Status.LIVE
    assert set(req.reviews.values_list("reviewer__username", flat=True)) == {"bob", "frank"}
    approved = _events(req, "request.approved").get()
    assert approved.actor == second_reviewer and approved.after["approvals"] == 2
    assert Deployment.objects.get(request=req).status == Deployment.Status.LIVE


def test_requester_never_approves_even_as_reviewer_and_superuser(
    synced, scientist_reviewer, reviewer, client, django_capture_on_commit_callbacks
):
    v1, _ = synced
    with django_capture_on_commit_callbacks(execute=True):
        req = services.deployment_request_create(
            requester=scientist_reviewer,
            model_version=v1,
            environment=Environment.objects.get(name="staging"),
            justification="mine",
        )
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    events_before = AuditEvent.objects.count()

    with pytest.raises(services.SeparationOfDutiesError):
        services.deployment_request_approve(request_id=req.pk, reviewer=scientist_reviewer)
    with pytest.raises(services.SeparationOfDutiesError):
        services.deployment_request_reject(
            request_id=req.pk, reviewer=scientist_reviewer, comment="no"
        )
    assert _post(client, scientist_reviewer, _url(req, "approve")).status_code == 403
    assert (
        _post(client, scientist_reviewer, _url(req, "reject"), {"comment": "x"}).status_code == 403
    )

    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert not req.reviews.exists()
    assert AuditEvent.objects.count() == events_before
    # The request is not in their queue either, but it is in another reviewer's.
    assert req not in selectors.review_queue(scientist_reviewer)
    assert req in selectors.review_queue(reviewer)


def test_only_the_environments_approver_group_may_approve(
    synced, awaiting_review, reviewer, staging, client, django_capture_on_commit_callbacks
):
    v1, _ = synced
    leads = Group.objects.create(name="ml leads")
    Environment.objects.filter(pk=staging.pk).update(approver_group=leads)
    lead = UserFactory(username="lena", roles=[])
    lead.groups.add(leads)
    req = awaiting_review(v1, "staging")

    with pytest.raises(PermissionDenied, match="ml leads"):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    assert _post(client, reviewer, _url(req, "approve")).status_code == 403
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW and not req.reviews.exists()
    assert req not in selectors.review_queue(reviewer)

    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=lead)
    req.refresh_from_db()
    assert req.status == Status.LIVE
    assert _events(req, "request.approved").get().actor == lead


def test_one_rejection_ends_a_partly_approved_request(
    synced, deploy, awaiting_review, reviewer, second_reviewer
):
    v1, _ = synced
    deploy(v1, "staging")
    req = awaiting_review(v1, "production")
    services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    with pytest.raises(ValidationError):
        services.deployment_request_reject(
            request_id=req.pk, reviewer=second_reviewer, comment="  "
        )
    services.deployment_request_reject(
        request_id=req.pk, reviewer=second_reviewer, comment="not yet"
    )
    req.refresh_from_db()
    assert req.status == Status.REJECTED and req.status_reason == "not yet"
    with pytest.raises(services.InvalidTransition):
        services.deployment_request_approve(
            request_id=req.pk, reviewer=UserFactory(username="ivan", roles=["reviewers"])
        )


# --- 2. promotion path -------------------------------------------------------------------


def test_production_requires_the_version_live_in_staging_first(
    synced, data_scientist, production, client
):
    v1, _ = synced
    with pytest.raises(ValidationError, match="staging"):
        services.deployment_request_create(
            requester=data_scientist, model_version=v1, environment=production, justification="skip"
        )
    response = _post(
        client,
        data_scientist,
        f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
        {"environment": production.pk, "strategy": "direct", "justification": "skip staging"},
    )
    assert response.status_code == 400
    assert "live in staging first" in response.content.decode()
    assert not DeploymentRequest.objects.exists()
    assert not AuditEvent.objects.filter(action="request.created").exists()


def test_production_allowed_once_the_version_was_live_in_staging(synced, deploy, awaiting_review):
    v1, v2 = synced
    deploy(v1, "staging")
    assert awaiting_review(v1, "production").status == Status.AWAITING_REVIEW
    with pytest.raises(ValidationError, match="staging"):
        awaiting_review(v2, "production")  # another version of the same model was not


# --- 2. freeze windows -------------------------------------------------------------------


def test_freeze_window_blocks_the_final_approval_until_an_admin_overrides(
    synced,
    awaiting_review,
    reviewer,
    data_scientist,
    platform_admin,
    staging,
    client,
    django_capture_on_commit_callbacks,
):
    v1, _ = synced
    now = timezone.now()
    with pytest.raises(PermissionDenied):
        services.freeze_window_create(
            environment=staging,
            actor=reviewer,
            starts_at=now,
            ends_at=now + timedelta(hours=1),
            reason="x",
        )
    window = services.freeze_window_create(
        environment=staging,
        actor=platform_admin,
        starts_at=now - timedelta(hours=1),
        ends_at=now + timedelta(days=1),
        reason="quarter close",
    )
    assert AuditEvent.objects.filter(
        action="environment.freeze_scheduled", object_id=str(window.pk)
    ).exists()
    req = awaiting_review(v1, "staging")
    assert req.status == Status.AWAITING_REVIEW

    with pytest.raises(services.Conflict, match="quarter close"):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    response = _post(client, reviewer, _url(req, "approve"))
    assert response.status_code == 409
    assert "frozen" in response.content.decode() and "quarter close" in response.content.decode()
    assert not req.reviews.exists()

    # Override: a reason is required, and only platform admins may.
    assert (
        _post(client, platform_admin, _url(req, "override-freeze"), {"reason": "  "}).status_code
        == 400
    )
    assert (
        _post(
            client, data_scientist, _url(req, "override-freeze"), {"reason": "hotfix"}
        ).status_code
        == 403
    )
    assert (
        _post(client, reviewer, _url(req, "override-freeze"), {"reason": "hotfix"}).status_code
        == 403
    )
    req.refresh_from_db()
    assert req.freeze_override_reason == "" and req.freeze_override_by is None
    assert not _events(req, "request.freeze_overridden").exists()

    response = _post(
        client, platform_admin, _url(req, "override-freeze"), {"reason": "security hotfix"}
    )
    assert response.status_code == 302
    req.refresh_from_db()
    assert (req.freeze_override_reason, req.freeze_override_by) == (
        "security hotfix",
        platform_admin,
    )
    event = _events(req, "request.freeze_overridden").get()
    assert event.actor == platform_admin and event.after == {"reason": "security hotfix"}

    with django_capture_on_commit_callbacks(execute=True):
        response = _post(client, reviewer, _url(req, "approve"))
    assert response.status_code == 302
    req.refresh_from_db()
    assert req.status == Status.LIVE


def test_freeze_window_elsewhere_or_later_does_not_block(
    synced, awaiting_review, reviewer, production, staging
):
    v1, _ = synced
    now = timezone.now()
    FreezeWindow.objects.create(
        environment=production,
        starts_at=now - timedelta(hours=1),
        ends_at=now + timedelta(hours=1),
        reason="prod",
    )
    FreezeWindow.objects.create(
        environment=staging,
        starts_at=now + timedelta(hours=1),
        ends_at=now + timedelta(hours=2),
        reason="later",
    )
    req = awaiting_review(v1, "staging")
    services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    req.refresh_from_db()
    assert req.status == Status.APPROVED


def test_freeze_override_refused_once_decided(synced, awaiting_review, reviewer, platform_admin):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    services.deployment_request_reject(request_id=req.pk, reviewer=reviewer, comment="no")
    with pytest.raises(services.InvalidTransition):
        services.deployment_request_override_freeze(
            request_id=req.pk, actor=platform_admin, reason="late"
        )


# --- 2. request expiry -------------------------------------------------------------------


def test_undecided_requests_expire_and_the_requester_hears(
    synced, awaiting_review, reviewer, staging, mailoutbox, django_capture_on_commit_callbacks
):
    v1, v2 = synced
    waiting = awaiting_review(v1, "staging")
    decided = awaiting_review(v2, "staging")
    services.deployment_request_reject(request_id=decided.pk, reviewer=reviewer, comment="no")
    assert waiting.expires_at == pytest.approx(
        waiting.created_at + timedelta(days=staging.request_expiry_days), abs=timedelta(seconds=5)
    )

    assert services.deployment_requests_expire(now=waiting.expires_at - timedelta(minutes=1)) == []
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        expired = services.deployment_requests_expire(now=waiting.expires_at + timedelta(seconds=1))
    assert expired == [waiting.pk]
    waiting.refresh_from_db()
    decided.refresh_from_db()
    assert waiting.status == Status.EXPIRED and "not decided by" in waiting.status_reason
    assert decided.status == Status.REJECTED
    event = _events(waiting, "request.expired").get()
    assert event.actor is None and event.actor_label == "system"
    assert (event.before, event.after) == ({"status": "awaiting_review"}, {"status": "expired"})
    assert not _events(decided, "request.expired").exists()
    assert [m.to for m in mailoutbox] == [["alice@example.com"]]
    assert "expired" in mailoutbox[0].subject
    # Running again finds nothing more.
    assert services.deployment_requests_expire(now=waiting.expires_at + timedelta(days=30)) == []


def test_expired_request_cannot_be_approved(synced, awaiting_review, reviewer):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    services.deployment_requests_expire(now=req.expires_at + timedelta(seconds=1))
    with pytest.raises(services.InvalidTransition):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)


# --- 3. cancellation and resubmission ----------------------------------------------------


def test_requester_cancels_before_review(synced, awaiting_review, data_scientist, reviewer, client):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    assert _post(client, reviewer, _url(req, "cancel")).status_code == 403
    response = _post(client, data_scientist, _url(req, "cancel"))
    assert response.status_code == 302
    req.refresh_from_db()
    assert req.status == Status.CANCELLED
    event = _events(req, "request.cancelled").get()
    assert event.actor == data_scientist and event.before == {"status": "awaiting_review"}


def test_cancel_after_approval_but_before_deployment_starts_prevents_it(
    synced, awaiting_review, data_scientist, reviewer, django_capture_on_commit_callbacks
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    with django_capture_on_commit_callbacks() as callbacks:
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    for callback in callbacks:  # the deployment task arrives after the cancellation
        callback()
    req.refresh_from_db()
    assert req.status == Status.CANCELLED
    assert not Deployment.objects.filter(request=req).exists()
    assert not _events(req, "deployment.started").exists()


def test_cancel_after_deployment_is_409(synced, deploy, data_scientist, client):
    v1, _ = synced
    req = deploy(v1, "staging")
    response = _post(client, data_scientist, _url(req, "cancel"))
    assert response.status_code == 409
    req.refresh_from_db()
    assert req.status == Status.LIVE
    assert not _events(req, "request.cancelled").exists()


def test_resubmission_after_rejection_is_a_new_linked_request(
    synced, awaiting_review, reviewer, data_scientist, client, django_capture_on_commit_callbacks
):
    v1, _ = synced
    old = awaiting_review(v1, "staging")
    services.deployment_request_reject(
        request_id=old.pk, reviewer=reviewer, comment="add a holdout report"
    )
    client.force_login(data_scientist)
    page = client.get(f"/rollouts/requests/new/{REGISTERED_MODEL}/1/?again={old.pk}")
    assert page.status_code == 200 and "add a holdout report" in page.content.decode()
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
            {
                "again": old.pk,
                "environment": old.endpoint.environment_id,
                "strategy": "direct",
                "justification": "report attached",
            },
        )
    assert response.status_code == 302
    new = DeploymentRequest.objects.exclude(pk=old.pk).get()
    assert new.previous_request == old and new.status == Status.AWAITING_REVIEW
    assert new.justification == "report attached"
    assert list(old.resubmissions.all()) == [new]
    old.refresh_from_db()
    assert old.status == Status.REJECTED  # the old request is not reopened
    assert _events(new, "request.created").get().after["previous_request"] == old.pk


def test_resubmitting_an_open_request_is_409(synced, awaiting_review, data_scientist, client):
    v1, _ = synced
    old = awaiting_review(v1, "staging")
    with pytest.raises(services.InvalidTransition):
        services.deployment_request_resubmit(
            request_id=old.pk, requester=data_scientist, justification="again"
        )
    response = _post(
        client,
        data_scientist,
        f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
        {
            "again": old.pk,
            "environment": old.endpoint.environment_id,
            "strategy": "direct",
            "justification": "again",
        },
    )
    assert response.status_code == 409
    assert DeploymentRequest.objects.count() == 1


def test_resubmission_by_someone_else_is_403(synced, awaiting_review, reviewer, teammate, client):
    v1, _ = synced
    old = awaiting_review(v1, "staging")
    services.deployment_request_reject(request_id=old.pk, reviewer=reviewer, comment="no")
    with pytest.raises(PermissionDenied):
        services.deployment_request_resubmit(
            request_id=old.pk, requester=teammate, justification="mine now"
        )
    response = _post(
        client,
        teammate,
        f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
        {
            "again": old.pk,
            "environment": old.endpoint.environment_id,
            "strategy": "direct",
            "justification": "mine",
        },
    )
    assert response.status_code == 403
    assert DeploymentRequest.objects.count() == 1


def test_unreadable_again_parameter_is_400_not_500(synced, data_scientist, client):
    client.force_login(data_scientist)
    assert client.get(f"/rollouts/requests/new/{REGISTERED_MODEL}/1/?again=abc").status_code == 400
    response = client.post(
        f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
        {"again": "1; drop", "environment": 1, "strategy": "direct", "justification": "x"},
    )
    assert response.status_code == 400
    assert not DeploymentRequest.objects.exists()


# --- 6. comments --------------------------------------------------------------------------


def test_comments_are_recorded_and_audited(
    synced, awaiting_review, reviewer, data_scientist, client
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    assert (
        _post(client, reviewer, _url(req, "comment"), {"body": "  Which holdout?  "}).status_code
        == 302
    )
    assert (
        _post(client, data_scientist, _url(req, "comment"), {"body": "The 2024 one."}).status_code
        == 302
    )
    comments = list(req.comments.values_list("author__username", "body"))
    assert comments == [("bob", "Which holdout?"), ("alice", "The 2024 one.")]
    events = _events(req, "request.commented").order_by("id")
    assert [(e.actor_label, e.after["comment"]) for e in events] == [
        ("bob", "Which holdout?"),
        ("alice", "The 2024 one."),
    ]
    page = client.get(_url(req))
    assert "Which holdout?" in page.content.decode()


def test_empty_comment_is_400_and_other_team_gets_404(
    synced, awaiting_review, reviewer, other_data_scientist, outsider, client
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    events_before = AuditEvent.objects.count()
    assert _post(client, reviewer, _url(req, "comment"), {"body": "   "}).status_code == 400
    assert (
        _post(client, other_data_scientist, _url(req, "comment"), {"body": "peek"}).status_code
        == 404
    )
    assert _post(client, outsider, _url(req, "comment"), {"body": "peek"}).status_code == 404
    assert not Comment.objects.exists()
    assert AuditEvent.objects.count() == events_before


# --- 6. notifications ---------------------------------------------------------------------


def test_reviewers_but_not_the_requester_hear_when_a_request_awaits_them(
    synced,
    scientist_reviewer,
    reviewer,
    second_reviewer,
    manager,
    mailoutbox,
    django_capture_on_commit_callbacks,
):
    v1, _ = synced
    with django_capture_on_commit_callbacks(execute=True):
        req = services.deployment_request_create(
            requester=scientist_reviewer,
            model_version=v1,
            environment=Environment.objects.get(name="staging"),
            justification="please",
        )
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    recipients = sorted(address for message in mailoutbox for address in message.to)
    assert recipients == ["bob@example.com", "frank@example.com"]
    assert all(
        "Review requested" in m.subject and f"/rollouts/requests/{req.pk}/" in m.body
        for m in mailoutbox
    )


def test_requester_hears_of_approval_and_going_live(
    synced, awaiting_review, reviewer, mailoutbox, django_capture_on_commit_callbacks
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    to_requester = [m.subject for m in mailoutbox if m.to == ["alice@example.com"]]
    assert len(mailoutbox) == len(to_requester) == 2
    assert any("was approved" in s for s in to_requester)
    assert any("is live" in s for s in to_requester)


def test_requester_hears_of_rejection_with_the_reason(
    synced, awaiting_review, reviewer, mailoutbox, django_capture_on_commit_callbacks
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_reject(
            request_id=req.pk, reviewer=reviewer, comment="needs calibration"
        )
    (message,) = mailoutbox
    assert message.to == ["alice@example.com"] and "rejected" in message.subject
    assert "needs calibration" in message.body


def test_requester_hears_of_failed_gates(synced, awaiting_review, mailoutbox):
    v1, _ = synced
    v1.input_example = None
    v1.save(update_fields=["input_example"])
    req = awaiting_review(v1, "staging")
    assert req.status == Status.GATES_FAILED
    (message,) = mailoutbox
    assert message.to == ["alice@example.com"] and "failed its automated gates" in message.subject
    assert "predicts_on_example" in message.body


# --- 1. team scoping ----------------------------------------------------------------------


def _team_a_urls(req: DeploymentRequest) -> list[str]:
    endpoint = req.endpoint.name
    return [
        f"/registry/{REGISTERED_MODEL}/",
        f"/registry/{REGISTERED_MODEL}/versions/1/",
        f"/registry/{REGISTERED_MODEL}/compare?a=1&b=2",
        _url(req),
        f"/monitoring/endpoints/{endpoint}/",
        f"/rollouts/endpoints/{endpoint}/timeline",
        f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
    ]


def test_other_team_gets_404_and_sees_nothing_in_lists(
    synced, deploy, other_data_scientist, client
):
    v1, _ = synced
    req = deploy(v1, "staging")
    client.force_login(other_data_scientist)
    for url in _team_a_urls(req):
        assert client.get(url).status_code == 404, url
    for url in (_url(req, "approve"), _url(req, "cancel"), _url(req, "comment")):
        assert client.post(url, {"body": "x"}).status_code == 404, url
    response = client.post(
        f"/rollouts/requests/new/{REGISTERED_MODEL}/1/",
        {"environment": req.endpoint.environment_id, "strategy": "direct", "justification": "mine"},
    )
    assert response.status_code == 404
    catalog = client.get("/registry/")
    assert catalog.status_code == 200 and list(catalog.context["models"]) == []
    assert REGISTERED_MODEL not in catalog.content.decode()
    requests_page = client.get("/rollouts/requests/")
    assert (
        list(requests_page.context["requests"]) == [] and list(requests_page.context["queue"]) == []
    )
    endpoints = client.get("/rollouts/endpoints/")
    assert endpoints.status_code == 200 and req.endpoint.name not in endpoints.content.decode()
    assert DeploymentRequest.objects.count() == 1
    with pytest.raises(PermissionDenied, match="does not belong"):
        services.deployment_request_create(
            requester=other_data_scientist,
            model_version=v1,
            environment=req.endpoint.environment,
            justification="x",
        )


@pytest.mark.parametrize("persona", ["data_scientist", "reviewer", "manager"])
def test_team_members_reviewers_and_managers_see_everything(
    synced, deploy, client, request, persona
):
    v1, _ = synced
    req = deploy(v1, "staging")
    client.force_login(request.getfixturevalue(persona))
    for url in _team_a_urls(req)[:-1]:
        assert client.get(url).status_code == 200, url
    assert [m.name for m in client.get("/registry/").context["models"]] == [REGISTERED_MODEL]
    assert list(client.get("/rollouts/requests/").context["requests"]) == [req]


def test_outsider_sees_no_request(synced, deploy, outsider, client):
    v1, _ = synced
    req = deploy(v1, "staging")
    client.force_login(outsider)
    assert client.get(_url(req)).status_code == 404
    assert list(client.get("/rollouts/requests/").context["requests"]) == []


# --- rollback and the "what served when" timeline -----------------------------------------


def _mlflow_alias(alias: str) -> int:
    client = mlflow.MlflowClient(settings.MLFLOW_TRACKING_URI)
    return int(client.get_model_version_by_alias(REGISTERED_MODEL, alias).version)


def test_rollback_restores_the_previous_release(
    synced,
    deploy,
    staging,
    reviewer,
    data_scientist,
    client,
    mailoutbox,
    django_capture_on_commit_callbacks,
):
    v1, v2 = synced
    # v2 scores a few points below v1 on the test split; allow it for this test.
    Environment.objects.filter(pk=staging.pk).update(metric_tolerance=0.1)
    first = deploy(v1, "staging")
    second = deploy(v2, "staging")
    first.refresh_from_db()
    assert (first.status, second.status) == (Status.SUPERSEDED, Status.LIVE)
    assert _mlflow_alias("staging") == 2
    endpoint = second.endpoint
    url = f"/rollouts/endpoints/{endpoint.name}/rollback"

    assert _post(client, data_scientist, url, {"reason": "errors"}).status_code == 403
    assert _post(client, reviewer, url, {"reason": "  "}).status_code == 400
    second.refresh_from_db()
    assert second.status == Status.LIVE

    mailoutbox.clear()
    with django_capture_on_commit_callbacks(execute=True):
        response = _post(client, reviewer, url, {"reason": "error rate doubled"})
    assert response.status_code == 302
    first.refresh_from_db()
    second.refresh_from_db()
    assert second.status == Status.ROLLED_BACK and second.status_reason == "error rate doubled"
    assert first.status == Status.LIVE
    live = Deployment.objects.get(endpoint=endpoint, status=Deployment.Status.LIVE)
    assert (live.model_version, live.traffic_weight) == (v1, 100)
    assert Deployment.objects.get(request=second).status == Deployment.Status.RETIRED
    assert _mlflow_alias("staging") == 1
    v1.registered_model.refresh_from_db()
    assert v1.registered_model.aliases["staging"] == 1
    assert _events(second, "deployment.rolled_back").get().actor == reviewer
    assert _events(first, "deployment.restored").get().actor == reviewer
    assert [m.to for m in mailoutbox] == [["alice@example.com"]] and "rolled back" in mailoutbox[
        0
    ].subject

    # Each traffic change went through traffic_set: one history row each, with its reason.
    history = list(TrafficHistory.objects.filter(endpoint=endpoint).order_by("pk"))
    assert [h.split for h in history] == [{"v1": 100}, {"v2": 100}, {"v1": 100}]
    assert [h.reason for h in history] == [
        f"request #{first.pk} went live (direct)",
        f"request #{second.pk} went live (direct)",
        f"rollback of request #{second.pk}: error rate doubled",
    ]
    assert [h.actor for h in history] == [None, None, reviewer]
    timeline = selectors.traffic_timeline(endpoint)
    assert [row["traffic"] for row in timeline] == [{"v1": 100}, {"v2": 100}, {"v1": 100}]
    assert [row["actor"] for row in timeline] == ["system", "system", "bob"]
    assert timeline[-1]["end"] is None and all(row["end"] for row in timeline[:-1])
    page = client.get(f"/rollouts/endpoints/{endpoint.name}/timeline")
    assert page.status_code == 200
    assert [row["traffic"] for row in page.context["timeline"]] == [
        {"v1": 100},
        {"v2": 100},
        {"v1": 100},
    ]

    # Nothing earlier than v1 to go back to now.
    assert _post(client, reviewer, url, {"reason": "again"}).status_code == 409
    first.refresh_from_db()
    assert first.status == Status.LIVE
    assert audit_verify().intact


def test_rollback_with_a_single_release_is_409(synced, deploy, reviewer, client):
    v1, _ = synced
    req = deploy(v1, "staging")
    events_before = AuditEvent.objects.count()
    response = _post(
        client, reviewer, f"/rollouts/endpoints/{req.endpoint.name}/rollback", {"reason": "oops"}
    )
    assert response.status_code == 409
    assert "no earlier release" in response.content.decode()
    req.refresh_from_db()
    assert req.status == Status.LIVE and AuditEvent.objects.count() == events_before

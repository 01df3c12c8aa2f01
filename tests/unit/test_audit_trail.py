"""The audit trail of the governance workflow: one event per action, the page's filters (model,
environment, actor, action, dates), the CSV export of the same selection, team scoping, and the
chain staying intact through all of it."""

from __future__ import annotations

import csv
import io
from datetime import datetime

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management import call_command
from django.utils import timezone

from portal.audit import audit_record, audit_verify
from portal.models import AuditEvent
from registry.models import RegisteredModel
from rollouts import services
from rollouts.models import DeploymentRequest, Environment
from tests.conftest import REGISTERED_MODEL
from tests.factories import UserFactory

Status = DeploymentRequest.Status
OTHER_MODEL = "fraud-detector"


@pytest.fixture
def history(
    synced,
    deploy,
    awaiting_review,
    reviewer,
    second_reviewer,
    data_scientist,
    other_team,
    other_data_scientist,
    monkeypatch,
):
    """A trail with: v1 deployed to staging (alice asks, bob approves), v2 rejected by frank with
    a comment by alice, and one older event (2025-03-14) about another team's model."""
    v1, v2 = synced
    # v2 scores a few points below v1; let its gates pass so that a reviewer rejects it.
    Environment.objects.filter(name="staging").update(metric_tolerance=0.1)
    live = deploy(v1, "staging")
    rejected = awaiting_review(v2, "staging")
    services.deployment_request_comment(
        request_id=rejected.pk, author=data_scientist, body="please look"
    )
    services.deployment_request_reject(
        request_id=rejected.pk, reviewer=second_reviewer, comment="not better"
    )
    other = RegisteredModel.objects.create(
        name=OTHER_MODEL, team=other_team, synced_at=timezone.now()
    )
    past = datetime(2025, 3, 14, 12, 0, tzinfo=timezone.get_current_timezone())
    with monkeypatch.context() as m:
        m.setattr(timezone, "now", lambda: past)
        audit_record(
            actor=other_data_scientist,
            action="registry.synced",
            obj=other,
            registered_model=OTHER_MODEL,
        )
    return {"live": live, "rejected": rejected}


def _page(client, user, **filters):
    client.force_login(user)
    response = client.get("/audit/", filters)
    assert response.status_code == 200, response.content[:500]
    return list(response.context["page"])


def _csv(client, user, **filters) -> list[dict[str, str]]:
    client.force_login(user)
    response = client.get("/audit/export.csv", filters)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/csv")
    text = b"".join(response.streaming_content).decode()
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0][:4] == ["id", "created_at", "actor", "action"]
    return [dict(zip(rows[0], row, strict=True)) for row in rows[1:]]


def _request_actions(req: DeploymentRequest) -> list[str]:
    return list(
        AuditEvent.objects.filter(object_type="rollouts.DeploymentRequest", object_id=str(req.pk))
        .order_by("id")
        .values_list("action", flat=True)
    )


def test_every_governance_action_writes_one_event(history):
    assert _request_actions(history["live"]) == [
        "request.created",
        "request.gates_passed",
        "request.approved",
        "deployment.started",
        "deployment.live",
    ]
    assert _request_actions(history["rejected"]) == [
        "request.created",
        "request.gates_passed",
        "request.commented",
        "request.rejected",
    ]
    endpoint = history["live"].endpoint
    assert (
        AuditEvent.objects.filter(action="traffic.changed", object_id=str(endpoint.pk)).count() == 1
    )
    assert (
        AuditEvent.objects.filter(action="registry.alias_set", environment="staging").count() == 1
    )
    approved = AuditEvent.objects.get(action="request.approved")
    assert (approved.actor_label, approved.registered_model, approved.environment) == (
        "bob",
        REGISTERED_MODEL,
        "staging",
    )
    assert (approved.before, approved.after["status"]) == (
        {"status": "awaiting_review"},
        "approved",
    )
    assert audit_verify().intact


def test_policy_changes_are_audited_with_before_and_after(
    db, platform_admin, reviewer, second_reviewer
):
    UserFactory(username="grace", roles=["reviewers"])  # three approvals need three reviewers
    staging = Environment.objects.get(name="staging")
    with pytest.raises(PermissionDenied):
        services.environment_policy_update(
            environment_id=staging.pk, actor=reviewer, changes={"required_approvals": 3}
        )
    services.environment_policy_update(
        environment_id=staging.pk,
        actor=platform_admin,
        changes={"required_approvals": 3, "metric_tolerance": 0.05},
    )
    event = AuditEvent.objects.get(action="environment.policy_changed")
    assert event.actor == platform_admin and event.environment == "staging"
    assert (event.before["required_approvals"], event.after["required_approvals"]) == (1, 3)
    assert (event.before["metric_tolerance"], event.after["metric_tolerance"]) == (0.0, 0.05)
    with pytest.raises(ValidationError):
        services.environment_policy_update(
            environment_id=staging.pk, actor=platform_admin, changes={"gates": ["telepathy"]}
        )
    production = Environment.objects.get(name="production")
    with pytest.raises(ValidationError, match="loop"):
        services.environment_policy_update(
            environment_id=staging.pk,
            actor=platform_admin,
            changes={"requires_live_in": production},
        )
    assert AuditEvent.objects.filter(action="environment.policy_changed").count() == 1
    assert audit_verify().intact


AUDIT_FILTER_CASES = [
    ({"model": OTHER_MODEL}, {"registry.synced"}),
    ({"action": "request.rejected"}, {"request.rejected"}),
    ({"actor": "frank"}, {"request.rejected"}),
    ({"actor": "alice", "action": "request.commented"}, {"request.commented"}),
    ({"environment": "production"}, set()),
    ({"until": "2025-03-14"}, {"registry.synced"}),
    ({"since": "2025-03-14", "until": "2025-03-14"}, {"registry.synced"}),
    ({"since": "2025-03-15", "model": OTHER_MODEL}, set()),
    ({"since": "2099-01-01"}, set()),
]


def test_audit_page_filters(history, client, manager):
    for filters, expected in AUDIT_FILTER_CASES:
        assert {e.action for e in _page(client, manager, **filters)} == expected, filters


def test_audit_page_filters_by_environment_and_model(history, client, manager):
    staging = _page(client, manager, environment="staging")
    assert staging and all(e.environment == "staging" for e in staging)
    model = _page(client, manager, model=REGISTERED_MODEL)
    assert model and all(e.registered_model == REGISTERED_MODEL for e in model)
    assert OTHER_MODEL not in {e.registered_model for e in model}
    assert {e.pk for e in staging} <= {e.pk for e in model} | set(
        AuditEvent.objects.filter(registered_model="").values_list("pk", flat=True)
    )
    today = timezone.localdate().isoformat()
    todays = _page(client, manager, since=today, until=today)
    assert len(todays) == AuditEvent.objects.count() - 1  # all but the 2025 event


def test_unreadable_dates_are_400_on_page_and_export(db, client, manager):
    client.force_login(manager)
    for bad in ({"since": "last week"}, {"until": "2025-13-45"}, {"since": "2025-02-30"}):
        assert client.get("/audit/", bad).status_code == 400, bad
        response = client.get("/audit/export.csv", bad)
        assert response.status_code == 400 and "YYYY-MM-DD" in response.content.decode(), bad


def test_csv_export_has_a_header_and_one_row_per_filtered_event(history, client, manager):
    everything = _csv(client, manager)
    assert len(everything) == AuditEvent.objects.count()
    assert [int(r["id"]) for r in everything] == sorted(
        int(r["id"]) for r in everything
    )  # oldest first
    rows = _csv(client, manager, environment="staging", action="request.approved")
    assert len(rows) == 1
    (row,) = rows
    event = AuditEvent.objects.get(action="request.approved")
    assert (row["id"], row["actor"], row["registered_model"], row["environment"], row["hash"]) == (
        str(event.pk),
        "bob",
        REGISTERED_MODEL,
        "staging",
        event.hash,
    )
    filtered = _csv(client, manager, model=REGISTERED_MODEL, since=timezone.localdate().isoformat())
    page = _page(client, manager, model=REGISTERED_MODEL, since=timezone.localdate().isoformat())
    assert sorted(int(r["id"]) for r in filtered) == sorted(e.pk for e in page)


def test_other_team_sees_none_of_team_a_events(
    history, client, other_data_scientist, data_scientist
):
    theirs = _page(client, other_data_scientist)
    assert [e.action for e in theirs] == ["registry.synced"]
    assert all(
        r["registered_model"] != REGISTERED_MODEL for r in _csv(client, other_data_scientist)
    )
    assert _page(client, other_data_scientist, model=REGISTERED_MODEL) == []
    assert _csv(client, other_data_scientist, actor="bob") == []
    ours = _page(client, data_scientist)
    assert ours and OTHER_MODEL not in {e.registered_model for e in ours}
    assert {e.action for e in ours} >= {"request.created", "request.approved", "request.rejected"}


def test_outsider_gets_403(history, client, outsider):
    client.force_login(outsider)
    assert client.get("/audit/").status_code == 403
    assert client.get("/audit/export.csv").status_code == 403


def test_chain_intact_after_the_workflow_and_broken_by_an_edit(history, capsys):
    call_command("verify_audit")
    assert f"intact: {AuditEvent.objects.count()} events" in capsys.readouterr().out
    approved = AuditEvent.objects.get(action="request.approved")
    with pytest.raises(PermissionError):
        approved.save()
    with pytest.raises(PermissionError):
        approved.delete()
    AuditEvent.objects.filter(pk=approved.pk).update(after={"status": "approved", "approvals": 5})
    report = audit_verify()
    assert not report.intact and report.broken_event_id == approved.pk

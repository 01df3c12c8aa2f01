"""The audit log: one event per action, hash-chained; ``verify_audit`` finds edits and removals."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from portal.audit import GENESIS_HASH, audit_record, audit_verify, event_hash
from portal.models import AuditChainHead, AuditEvent
from registry.models import RegisteredModel
from rollouts import services
from rollouts.models import Deployment, Environment
from tests.conftest import REGISTERED_MODEL


@pytest.fixture
def chain(db, data_scientist):
    """Five events appended by hand (no MLflow needed); returns them oldest first."""
    model = RegisteredModel.objects.create(name="chained", synced_at="2025-01-01T00:00:00Z")
    events = [
        audit_record(
            actor=data_scientist if i % 2 else None,
            action=f"test.step{i}",
            obj=model,
            before={"step": i - 1, "note": "ça va ✓"},
            after={"step": i, "score": 0.1 * i, "nested": {"b": [1, 2.5, None], "a": True}},
        )
        for i in range(5)
    ]
    return events


def _verify(capsys=None) -> str:
    call_command("verify_audit")
    return capsys.readouterr().out if capsys else ""


def _actions(**filters) -> list[str]:
    return list(
        AuditEvent.objects.filter(**filters).order_by("id").values_list("action", flat=True)
    )


# --- every action writes one event ---------------------------------------------------------------


def test_every_action_writes_one_event(
    data_scientist,
    reviewer,
    platform_admin,
    synced,
    awaiting_review,
    django_capture_on_commit_callbacks,
    capsys,
):
    v1, v2 = synced
    staging = Environment.objects.get(name="staging")
    sync_events = _actions()
    assert sync_events == ["registry.sync"]

    rejected = awaiting_review(v2)
    services.deployment_request_comment(request_id=rejected.pk, author=reviewer, body="why v2?")
    services.deployment_request_reject(request_id=rejected.pk, reviewer=reviewer, comment="not yet")
    live = awaiting_review(v1)
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=live.pk, reviewer=reviewer, comment="lgtm")
    # v2 scores below the live v1 on the held-out split: the metrics gate stops it.
    gated = awaiting_review(v2)
    assert gated.status == "gates_failed", gated.status_reason
    cancelled = services.deployment_request_create(
        requester=data_scientist, model_version=v2, environment=staging, justification="third"
    )
    services.deployment_request_cancel(request_id=cancelled.pk, actor=data_scientist)
    key, _ = services.api_key_create(
        name="web", endpoints=[live.endpoint], created_by=platform_admin
    )
    services.api_key_revoke(key_id=key.pk, actor=platform_admin)
    services.api_key_revoke(key_id=key.pk, actor=platform_admin)  # already revoked: no event

    assert _actions(object_type="rollouts.DeploymentRequest", object_id=str(rejected.pk)) == [
        "request.created",
        "request.gates_passed",
        "request.commented",
        "request.rejected",
    ]
    assert _actions(object_type="rollouts.DeploymentRequest", object_id=str(live.pk)) == [
        "request.created",
        "request.gates_passed",
        "request.approved",
        "deployment.started",
        "deployment.live",
    ]
    assert _actions(object_type="rollouts.DeploymentRequest", object_id=str(gated.pk)) == [
        "request.created",
        "request.gates_failed",
    ]
    assert _actions(object_type="rollouts.DeploymentRequest", object_id=str(cancelled.pk)) == [
        "request.created",
        "request.cancelled",
    ]
    assert _actions(object_type="rollouts.Endpoint") == ["traffic.changed"]
    assert _actions(object_type="registry.ModelVersion", object_id=str(v1.pk)) == [
        "registry.alias_set"
    ]
    assert _actions(object_type="rollouts.ApiKey") == ["api_key.created", "api_key.revoked"]
    assert AuditEvent.objects.count() == 1 + 4 + 5 + 2 + 2 + 1 + 1 + 2

    approved = AuditEvent.objects.get(action="request.approved")
    assert (approved.actor, approved.actor_label) == (reviewer, "bob")
    assert (approved.registered_model, approved.environment) == (REGISTERED_MODEL, "staging")
    assert approved.before == {"status": "awaiting_review"}
    assert approved.after == {"status": "approved", "approvals": 1, "comment": "lgtm"}
    passed = AuditEvent.objects.filter(action="request.gates_passed", object_id=str(live.pk)).get()
    assert passed.actor_label == "system"
    assert passed.before == {"status": "pending_gates"}
    assert passed.after["status"] == "awaiting_review"
    assert passed.after["artifact_digest"] == Deployment.objects.get(request=live).artifact_digest
    assert set(passed.after["gates"]) == set(staging.gates) and all(passed.after["gates"].values())
    failed = AuditEvent.objects.get(action="request.gates_failed")
    assert failed.after["gates"]["metrics_within_tolerance"] is False
    assert AuditEvent.objects.get(action="deployment.live").actor_label == "system"
    traffic = AuditEvent.objects.get(action="traffic.changed")
    assert (traffic.before, traffic.after) == ({"traffic": {}}, {"traffic": {"v1": 100}})
    assert (traffic.registered_model, traffic.environment) == (REGISTERED_MODEL, "staging")
    # Every event about the model's requests, deployments and aliases names it and its stage.
    about_requests = AuditEvent.objects.exclude(action__startswith="api_key.").exclude(
        action="registry.sync"
    )
    assert set(about_requests.values_list("registered_model", "environment")) == {
        (REGISTERED_MODEL, "staging")
    }

    assert audit_verify().intact
    assert "audit chain intact: 18 events" in _verify(capsys)


# --- the hash chain -----------------------------------------------------------------------------


def test_chain_links_each_event_to_the_previous(chain):
    assert chain[0].prev_hash == GENESIS_HASH
    for prev, event in zip(chain, chain[1:], strict=False):
        assert event.prev_hash == prev.hash
    stored = AuditEvent.objects.order_by("id")
    # The hash is computed from the values as stored and read back (JSON, datetimes, unicode).
    assert [event_hash(e) for e in stored] == [e.hash for e in stored]
    head = AuditChainHead.objects.get(pk=1)
    assert (head.length, head.last_hash) == (5, chain[-1].hash)


def test_verify_says_intact(chain, capsys):
    assert audit_verify().intact
    assert "audit chain intact: 5 events" in _verify(capsys)


@pytest.mark.parametrize(
    "change",
    [
        {"actor_label": "eve"},
        {"action": "test.harmless"},
        {"after": {"step": 2, "score": 0.2}},
        {"object_repr": "something else"},
        {"created_at": "2020-01-01T00:00:00Z"},
    ],
    ids=lambda change: next(iter(change)),
)
def test_verify_detects_an_edited_row(chain, change):
    target = chain[2]
    assert AuditEvent.objects.filter(pk=target.pk).update(**change) == 1  # bypasses save()
    with pytest.raises(CommandError, match=rf"event #{target.pk}\b.*altered"):
        call_command("verify_audit")
    assert audit_verify().broken_event_id == target.pk


def test_verify_detects_a_rehashed_row(chain):
    """Recomputing the edited row's own hash does not help: the next link breaks."""
    target = AuditEvent.objects.get(pk=chain[2].pk)
    target.actor_label = "eve"
    AuditEvent.objects.filter(pk=target.pk).update(actor_label="eve", hash=event_hash(target))
    with pytest.raises(CommandError, match=rf"event #{chain[3].pk}\b"):
        call_command("verify_audit")


def test_verify_detects_a_deleted_middle_row(chain):
    removed = chain[2]
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AuditEvent._meta.db_table} WHERE id = %s", [removed.pk])
    assert not AuditEvent.objects.filter(pk=removed.pk).exists()
    with pytest.raises(CommandError) as exc:
        call_command("verify_audit")
    message = str(exc.value)
    # The break is reported at the first event whose link no longer holds, and the message
    # names the gap where the removed event was.
    assert f"event #{chain[3].pk}" in message
    assert f"#{chain[1].pk}" in message
    assert "2 events verified" in message


def test_verify_detects_a_deleted_first_row(chain):
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AuditEvent._meta.db_table} WHERE id = %s", [chain[0].pk])
    with pytest.raises(CommandError, match=rf"event #{chain[1].pk}\b"):
        call_command("verify_audit")


def test_verify_detects_a_removed_last_row(chain):
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AuditEvent._meta.db_table} WHERE id = %s", [chain[-1].pk])
    with pytest.raises(CommandError, match="end of chain"):
        call_command("verify_audit")
    report = audit_verify()
    assert (report.intact, report.checked) == (False, 4)


def test_verify_detects_a_removed_tail_with_its_head(chain):
    """Deleting the chain head as well must not hide a removed last event."""
    with connection.cursor() as cursor:
        cursor.execute(f"DELETE FROM {AuditEvent._meta.db_table} WHERE id = %s", [chain[-1].pk])
        cursor.execute(f"DELETE FROM {AuditChainHead._meta.db_table}")
    with pytest.raises(CommandError, match="head"):
        call_command("verify_audit")


def test_appending_after_a_check_keeps_the_chain_intact(chain, reviewer):
    assert audit_verify().intact
    audit_record(actor=reviewer, action="test.more", target=("registry", "all", "whole registry"))
    report = audit_verify()
    assert (report.intact, report.checked) == (True, 6)


def test_events_are_append_only(chain):
    event = AuditEvent.objects.get(pk=chain[1].pk)
    event.actor_label = "eve"
    with pytest.raises(PermissionError):
        event.save()
    with pytest.raises(PermissionError):
        event.delete()
    assert AuditEvent.objects.get(pk=chain[1].pk).actor_label == chain[1].actor_label
    assert audit_verify().intact


def test_audit_record_needs_an_object(db):
    with pytest.raises(ValueError):
        audit_record(actor=None, action="test.nothing")
    assert not AuditEvent.objects.exists()

"""The canary executor (``rollouts.executor``), driven through the services with the analysis
on real log rows: a worse canary is rolled back by itself, a good one is promoted step by step,
too little data extends then waits for a person, and every control and bad input is refused
or audited. The weights add up to 100 at every step."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from monitoring.models import GroundTruth
from portal.errors import Conflict
from portal.models import AuditEvent
from rollouts import executor, services
from rollouts.models import (
    Deployment,
    DeploymentRequest,
    Environment,
    PredictionLog,
    Rollout,
    TrafficHistory,
)

Status = DeploymentRequest.Status
PARAMS = {"steps": [20, 50, 100], "interval_s": 60, "max_extensions": 1}


@pytest.fixture
def staging(db):
    env = Environment.objects.get(name="staging")
    env.analysis_policy = {"min_requests": 50, "min_labels": 50}
    env.metric_tolerance = 0.1  # v2 (a forest) scores a little below v1 offline
    env.save(update_fields=["analysis_policy", "metric_tolerance"])
    return env


@pytest.fixture
def canary(synced, deploy, staging):
    """v1 live (stable) on staging, then a canary of v2 at 20 %."""
    v1, v2 = synced
    stable = deploy(v1, "staging")
    assert stable.status == Status.LIVE
    req = deploy(v2, "staging", strategy="canary", strategy_params=PARAMS)
    assert req.status == Status.ROLLING_OUT, req.status_reason
    return req


def _weights(endpoint) -> dict[int, int]:
    live = Deployment.objects.filter(endpoint=endpoint, status=Deployment.Status.LIVE)
    weights = {d.model_version.version: d.traffic_weight for d in live}
    assert sum(weights.values()) == 100, weights
    return weights


def _serve(deployment, n: int, *, correct: float, start=None):
    """``n`` answered requests of one row each, labelled: the first ``correct`` share right."""
    at = start or timezone.now()
    for i in range(n):
        row = PredictionLog.objects.create(
            request_id=uuid.uuid4(), endpoint=deployment.endpoint, deployment=deployment,
            model_version=deployment.model_version, features={}, prediction=1, latency_ms=10.0,
            created_at=at,
        )  # fmt: skip
        GroundTruth.objects.create(prediction=row, label=int(i < correct * n), received_at=at)


def _due(req) -> Rollout:
    rollout = Rollout.objects.get(request=req)
    Rollout.objects.filter(pk=rollout.pk).update(next_check_at=timezone.now())
    return rollout


def _advance(req) -> Rollout:
    return executor.rollout_advance(rollout_id=_due(req).pk)


def _parts(req):
    req.refresh_from_db()
    stable = Deployment.objects.get(
        endpoint=req.endpoint, role=Deployment.Role.STABLE, status=Deployment.Status.LIVE
    )
    return stable, Deployment.objects.get(request=req)


def test_the_canary_starts_at_its_first_step_beside_stable(canary):
    assert _weights(canary.endpoint) == {1: 80, 2: 20}
    rollout = Rollout.objects.get(request=canary)
    assert rollout.state == Rollout.State.PROGRESSING
    assert [s.planned_weight for s in rollout.steps.all()] == [20, 50, 100]
    assert rollout.next_check_at > timezone.now() + timedelta(seconds=50)
    history = TrafficHistory.objects.filter(endpoint=canary.endpoint).latest("created_at")
    assert history.rollout_step.index == 0 and history.split == {"v1": 80, "v2": 20}
    assert AuditEvent.objects.filter(action="rollout.started", object_id=str(canary.pk)).exists()
    assert canary.strategy_params == PARAMS


def test_a_worse_canary_is_rolled_back_by_itself_on_accuracy(canary):
    stable, new = _parts(canary)
    start = Rollout.objects.get(request=canary).steps.get(index=0).started_at
    _serve(stable, 200, correct=0.95, start=start)
    _serve(new, 100, correct=0.5, start=start)  # trained on shuffled labels
    rollout = _advance(canary)
    assert rollout.state == Rollout.State.ABORTED
    canary.refresh_from_db()
    assert canary.status == Status.ROLLED_BACK
    assert "accuracy" in canary.status_reason and "50.00%" in canary.status_reason
    assert _weights(canary.endpoint) == {1: 100}
    assert Deployment.objects.get(request=canary).status == Deployment.Status.RETIRED
    step = rollout.steps.get(index=0)
    assert step.verdict == "fail" and step.ended_at is not None
    checks = {c["metric"]: c for c in step.figures["checks"]}
    assert checks["accuracy"]["outcome"] == "fail" and checks["accuracy"]["canary"] == 0.5
    assert AuditEvent.objects.filter(action="rollout.aborted", object_id=str(canary.pk)).exists()


def test_a_good_canary_is_promoted_step_by_step(canary):
    stable, new = _parts(canary)
    rollout = Rollout.objects.get(request=canary)
    for index, expected in ((0, {1: 50, 2: 50}), (1, {2: 100})):
        start = rollout.steps.get(index=index).started_at
        _serve(stable, 100, correct=0.9, start=start)
        _serve(new, 100, correct=0.9, start=start)
        rollout = _advance(canary)
        assert _weights(canary.endpoint) == expected
        assert rollout.steps.get(index=index).verdict == "pass"
    assert rollout.state == Rollout.State.SUCCEEDED
    canary.refresh_from_db()
    assert canary.status == Status.LIVE
    new.refresh_from_db()
    stable.refresh_from_db()
    assert (new.role, new.status) == (Deployment.Role.STABLE, Deployment.Status.LIVE)
    assert stable.status == Deployment.Status.RETIRED
    assert DeploymentRequest.objects.get(pk=stable.request_id).status == Status.SUPERSEDED
    assert services.champion_of(canary.endpoint) == new.model_version


def test_too_little_data_extends_the_step_then_waits_for_a_person(canary, reviewer):
    rollout = _advance(canary)  # no traffic at all
    assert rollout.state == Rollout.State.PROGRESSING
    assert rollout.steps.get(index=0).figures["extensions"] == 1
    assert rollout.next_check_at > timezone.now()
    assert _weights(canary.endpoint) == {1: 80, 2: 20}  # no data is never a pass
    rollout = _advance(canary)
    assert rollout.state == Rollout.State.AWAITING_PERSON
    assert "not enough data" in rollout.state_reason
    rollout = executor.rollout_control(rollout_id=rollout.pk, actor=reviewer, action="resume")
    assert rollout.state == Rollout.State.PROGRESSING
    assert rollout.steps.get(index=0).ended_at is None


def test_a_due_check_runs_once_and_a_claimed_rollout_is_left_alone(canary):
    rollout = Rollout.objects.get(request=canary)
    assert executor.rollout_advance(rollout_id=rollout.pk).steps.get(index=0).verdict == ""
    Rollout.objects.filter(pk=rollout.pk).update(
        next_check_at=timezone.now(),
        lease_owner="other",
        lease_until=timezone.now() + timedelta(minutes=1),
    )
    assert executor.rollout_advance(rollout_id=rollout.pk).steps.get(index=0).verdict == ""
    assert executor.rollouts_due() == []
    Rollout.objects.filter(pk=rollout.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert executor.rollouts_due() == [rollout.pk]  # the claimant died: beat sends it again


def test_controls_pause_resume_promote_and_abort(canary, reviewer, data_scientist):
    rollout = Rollout.objects.get(request=canary)
    with pytest.raises(PermissionDenied):
        executor.rollout_control(rollout_id=rollout.pk, actor=data_scientist, action="pause")
    paused = executor.rollout_control(rollout_id=rollout.pk, actor=reviewer, action="pause")
    assert paused.state == Rollout.State.PAUSED
    assert executor.rollout_advance(rollout_id=_due(canary).pk).state == Rollout.State.PAUSED
    with pytest.raises(ValidationError):
        executor.rollout_control(rollout_id=rollout.pk, actor=reviewer, action="promote")
    with pytest.raises(ValidationError):
        executor.rollout_control(rollout_id=rollout.pk, actor=reviewer, action="launch")
    done = executor.rollout_control(
        rollout_id=rollout.pk, actor=reviewer, action="promote", reason="urgent fix, checked"
    )
    assert done.state == Rollout.State.SUCCEEDED and _weights(canary.endpoint) == {2: 100}
    assert AuditEvent.objects.filter(action="rollout.promote", actor=reviewer).exists()
    with pytest.raises(Conflict):
        executor.rollout_control(rollout_id=rollout.pk, actor=reviewer, action="abort", reason="x")


def test_abort_by_a_person_and_rollback_during_a_canary(canary, reviewer):
    services.deployment_rollback(
        endpoint_id=canary.endpoint_id, actor=reviewer, reason="bad predictions"
    )
    canary.refresh_from_db()
    assert canary.status == Status.ROLLED_BACK and "bad predictions" in canary.status_reason
    assert _weights(canary.endpoint) == {1: 100}
    assert Rollout.objects.get(request=canary).state == Rollout.State.ABORTED


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"steps": [50, 20, 100]}, "steps"),
        ({"steps": [10, 200]}, "steps"),
        ({"steps": []}, "steps"),
        ({"interval_s": 0}, "interval_s"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_bad_canary_requests_are_refused_and_nothing_is_created(
    synced, deploy, staging, data_scientist, params, field
):
    v1, v2 = synced
    deploy(v1, "staging")
    count = DeploymentRequest.objects.count()
    with pytest.raises(ValidationError) as caught:
        services.deployment_request_create(
            requester=data_scientist, model_version=v2, environment=staging,
            strategy="canary", strategy_params=params, justification="j",
        )  # fmt: skip
    assert field in caught.value.message_dict
    assert DeploymentRequest.objects.count() == count


def test_a_canary_needs_a_stable_and_an_environment_that_allows_it(synced, staging, data_scientist):
    v1, _ = synced
    with pytest.raises(ValidationError, match="deploy the first release directly"):
        services.deployment_request_create(
            requester=data_scientist, model_version=v1, environment=staging,
            strategy="canary", justification="j",
        )  # fmt: skip
    staging.allowed_strategies = ["direct"]
    staging.save(update_fields=["allowed_strategies"])
    with pytest.raises(ValidationError, match="does not allow the canary strategy"):
        services.deployment_request_create(
            requester=data_scientist, model_version=v1, environment=staging,
            strategy="canary", justification="j",
        )  # fmt: skip


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("allowed_strategies", []),
        ("allowed_strategies", ["yolo"]),
        ("rollout_defaults", {"canary": {"steps": [5, 1]}}),
        ("rollout_defaults", {"nope": {}}),
        ("analysis_policy", {"alpha": 2}),
        ("analysis_policy", {"bogus": 1}),
    ],
)
def test_a_bad_rollout_policy_is_refused(db, platform_admin, field, value):
    env = Environment.objects.get(name="staging")
    with pytest.raises(ValidationError) as caught:
        services.environment_policy_update(
            environment_id=env.pk, actor=platform_admin, changes={field: value}
        )
    assert field in caught.value.message_dict
    env.refresh_from_db()
    assert env.allowed_strategies == ["direct", "canary"]


def test_the_rollout_page_shows_steps_weights_and_controls(canary, client, reviewer, manager):
    client.force_login(manager)
    page = client.get(f"/rollouts/requests/{canary.pk}/rollout")
    assert page.status_code == 200
    html = page.content.decode()
    assert "v1 (stable) · 80%" in html and "v2 (canary) · 20%" in html
    assert "next check in" in html and "Promote" not in html  # a manager only reads
    fragment = client.get(f"/rollouts/requests/{canary.pk}/rollout", headers={"HX-Request": "true"})
    assert fragment.content.decode().lstrip().startswith('<div id="rollout-live"')
    assert 'data-testid="rollout-link"' in client.get(canary.get_absolute_url()).content.decode()
    client.force_login(reviewer)
    assert "Promote" in client.get(f"/rollouts/requests/{canary.pk}/rollout").content.decode()
    url = f"/rollouts/requests/{canary.pk}/rollout/promote"
    assert client.post(url, {"reason": ""}).status_code == 400  # a reason is required
    assert client.post(url, {"reason": "checked by hand"}).status_code == 302
    assert client.post(url, {"reason": "again"}).status_code == 409  # finished
    assert client.post(f"/rollouts/requests/{canary.pk}/rollout/launch").status_code in (400, 409)


def test_the_rollout_api_reads_and_controls(canary, reviewer):
    from rest_framework.test import APIClient

    api = APIClient()
    api.force_authenticate(reviewer)
    body = api.get(f"/api/requests/{canary.pk}/rollout").json()
    assert body["state"] == "progressing" and body["traffic"] == {"v1": 80, "v2": 20}
    assert [s["planned_weight"] for s in body["steps"]] == [20, 50, 100]
    assert api.post(f"/api/requests/{canary.pk}/rollout/abort", {}).status_code == 400
    done = api.post(f"/api/requests/{canary.pk}/rollout/abort", {"reason": "wrong data"})
    assert done.status_code == 200 and done.json()["state"] == "aborted"
    again = api.post(f"/api/requests/{canary.pk}/rollout/pause", {})
    assert again.status_code == 409


def test_the_challenger_alias_names_the_running_canary_only(
    canary, django_capture_on_commit_callbacks
):
    from registry import mlflow_client

    def aliases():
        client = mlflow_client._client()
        return client.get_registered_model(canary.model_version.registered_model.name).aliases

    assert aliases().get("challenger") == 2
    assert aliases().get("staging") == 1  # the environment's alias stays on stable
    stable, new = _parts(canary)
    start = Rollout.objects.get(request=canary).steps.get(index=0).started_at
    _serve(stable, 200, correct=0.95, start=start)
    _serve(new, 100, correct=0.5, start=start)
    with django_capture_on_commit_callbacks(execute=True):
        assert _advance(canary).state == Rollout.State.ABORTED
    assert "challenger" not in aliases() and aliases().get("staging") == 1
    canary.model_version.registered_model.refresh_from_db()
    assert "challenger" not in canary.model_version.registered_model.aliases


def test_consecutive_canaries_never_leak_traffic_to_an_aborted_one(canary, deploy, reviewer):
    """Stable v1, canary v2 at 20 %, aborted; a new canary of v2 at 30 % gives 70/30 between
    v1 and the new deployment, and nothing to the aborted one (KServe's known leak)."""
    first = Deployment.objects.get(request=canary)
    executor.rollout_control(
        rollout_id=Rollout.objects.get(request=canary).pk,
        actor=reviewer,
        action="abort",
        reason="retry with a larger first step",
    )
    again = deploy(
        canary.model_version, "staging", strategy="canary", strategy_params={"steps": [30, 100]}
    )
    assert again.status == Status.ROLLING_OUT, again.status_reason
    assert _weights(canary.endpoint) == {1: 70, 2: 30}
    first.refresh_from_db()
    assert (first.status, first.traffic_weight) == (Deployment.Status.RETIRED, 0)
    assert Deployment.objects.get(request=again).traffic_weight == 30


def test_the_endpoint_dashboard_marks_the_rollout_steps(canary, client, manager):
    client.force_login(manager)
    page = client.get(f"/monitoring/endpoints/{canary.endpoint.name}/")
    assert page.status_code == 200
    html = page.content.decode()
    # the canary's first step, marked on the time axis (in the charts' JSON)
    assert "v1 80% \\u00b7 v2 20%" in html
    assert "v1 100%" in html  # the first release

"""A home for rollouts (issue 10, point 1): stable is an explicit row, one selector answers
"what is stable / what is canary", and a database constraint allows one live stable per
endpoint."""

from __future__ import annotations

import importlib
from datetime import timedelta

import pytest
from django.apps import apps
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from monitoring.selectors import live_versions
from portal.audit import audit_record, audit_verify
from portal.models import AuditEvent
from registry.models import ModelVersion, RegisteredModel
from rollouts import selectors, services
from rollouts.models import (
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    PredictionLog,
    Rollout,
    RolloutStep,
    TrafficHistory,
)

NOW = timezone.now()
Role = Deployment.Role
LIVE = Deployment.Status.LIVE


@pytest.fixture
def churn(team):
    """``churn`` v1..v3 and its staging endpoint, nothing deployed yet."""
    model = RegisteredModel.objects.create(name="churn", team=team, synced_at=NOW)
    for n in (1, 2, 3):
        ModelVersion.objects.create(
            registered_model=model, version=n, status="READY", synced_at=NOW
        )
    return Endpoint.objects.create(
        name="churn-staging",
        environment=Environment.objects.get(name="staging"),
        registered_model=model,
    )


def _deploy(endpoint, number, requester, *, weight, role=Role.STABLE, status=LIVE, live_at=NOW):
    version = ModelVersion.objects.get(registered_model=endpoint.registered_model, version=number)
    req = DeploymentRequest.objects.create(
        model_version=version,
        endpoint=endpoint,
        justification="test",
        requester=requester,
        status=DeploymentRequest.Status.LIVE
        if status == LIVE
        else DeploymentRequest.Status.SUPERSEDED,
    )
    return Deployment.objects.create(
        endpoint=endpoint,
        model_version=version,
        request=req,
        status=status,
        role=role,
        traffic_weight=weight,
        live_at=live_at,
    )


def test_at_most_one_live_stable_per_endpoint_is_a_database_constraint(churn, data_scientist):
    _deploy(churn, 1, data_scientist, weight=100)
    _deploy(churn, 2, data_scientist, weight=0, status=Deployment.Status.RETIRED)  # retired: fine
    _deploy(churn, 3, data_scientist, weight=0, role=Role.CANARY)  # a live canary beside: fine
    with pytest.raises(IntegrityError), transaction.atomic():
        Deployment.objects.filter(model_version__version=3).update(role=Role.STABLE)
    with pytest.raises(IntegrityError), transaction.atomic():
        Deployment.objects.filter(model_version__version=2).update(status=LIVE)
    assert Deployment.objects.filter(endpoint=churn, status=LIVE, role=Role.STABLE).count() == 1


def test_stable_is_the_row_not_the_largest_weight(churn, data_scientist):
    """A canary that has more traffic than stable (e.g. 60 % in a late step) is still the
    canary everywhere: the selector, the champion the gates compare with, the dashboards."""
    stable = _deploy(churn, 1, data_scientist, weight=40, live_at=NOW - timedelta(days=1))
    canary = _deploy(churn, 2, data_scientist, weight=60, role=Role.CANARY)
    assert selectors.endpoint_roles(churn) == (stable, canary)
    assert selectors.stable_of(churn) == stable
    assert services.champion_of(churn).version == 1
    assert [
        (lv.version, lv.role, lv.traffic_weight) for lv in live_versions([churn.pk])[churn.pk]
    ] == [
        (1, "stable", 40),
        (2, "canary", 60),
    ]


def test_nothing_live_has_no_roles(churn, data_scientist):
    _deploy(churn, 1, data_scientist, weight=0, status=Deployment.Status.RETIRED)
    assert selectors.endpoint_roles(churn) == (None, None)
    assert services.champion_of(churn) is None
    assert live_versions([churn.pk]) == {}


def test_live_deployments_by_role_is_one_query_for_many_endpoints(
    churn, data_scientist, django_assert_num_queries
):
    other = Endpoint.objects.create(
        name="churn-production",
        environment=Environment.objects.get(name="production"),
        registered_model=churn.registered_model,
    )
    _deploy(churn, 1, data_scientist, weight=90)
    _deploy(churn, 2, data_scientist, weight=10, role=Role.CANARY)
    _deploy(other, 1, data_scientist, weight=100)
    with django_assert_num_queries(1):
        live = selectors.live_deployments_by_role([churn.pk, other.pk])
        roles = {e: [(d.model_version.version, d.role) for d in ds] for e, ds in live.items()}
    assert roles == {churn.pk: [(1, "stable"), (2, "canary")], other.pk: [(1, "stable")]}


def test_the_migration_backfills_roles_from_weights(churn, data_scientist):
    """Live rows from before ``role`` existed: per endpoint the largest weight is stable (ties:
    the one live first), the other live ones canaries; rows not live are left alone."""
    tie = Endpoint.objects.create(
        name="churn-production",
        environment=Environment.objects.get(name="production"),
        registered_model=churn.registered_model,
    )
    # Written as canaries, so that the constraint lets the test set up "no role known yet".
    small = _deploy(
        churn, 1, data_scientist, weight=10, role=Role.CANARY, live_at=NOW - timedelta(days=2)
    )
    big = _deploy(churn, 2, data_scientist, weight=90, role=Role.CANARY)
    old = _deploy(
        churn, 3, data_scientist, weight=0, role=Role.CANARY, status=Deployment.Status.RETIRED
    )
    first = _deploy(
        tie, 1, data_scientist, weight=50, role=Role.CANARY, live_at=NOW - timedelta(hours=1)
    )
    later = _deploy(tie, 2, data_scientist, weight=50, role=Role.CANARY)
    migration = importlib.import_module("rollouts.migrations.0009_deployment_role")
    migration.backfill_roles(apps, None)
    roles = dict(Deployment.objects.values_list("pk", "role"))
    assert roles == {
        small.pk: "canary",
        big.pk: "stable",
        old.pk: "canary",
        first.pk: "stable",
        later.pk: "canary",
    }


# --- (b) one traffic writer ---------------------------------------------------------------


@pytest.fixture
def stable_and_canary(churn, data_scientist):
    """v1 stable at 100 %, v2 a live canary at 0 %, v3 retired."""
    return (
        _deploy(churn, 1, data_scientist, weight=100, live_at=NOW - timedelta(days=1)),
        _deploy(churn, 2, data_scientist, weight=0, role=Role.CANARY),
        _deploy(churn, 3, data_scientist, weight=0, status=Deployment.Status.RETIRED),
    )


def _weights(endpoint):
    return dict(endpoint.deployments.values_list("model_version__version", "traffic_weight"))


def test_traffic_set_writes_weights_one_history_row_and_one_audit_event(
    churn, stable_and_canary, reviewer
):
    stable, canary, _ = stable_and_canary
    history = services.traffic_set(
        endpoint=churn, split={stable.pk: 90, canary.pk: 10}, actor=reviewer, reason=" step 1 "
    )
    assert _weights(churn) == {1: 90, 2: 10, 3: 0}
    assert TrafficHistory.objects.get() == history
    assert (history.split, history.deployment_split) == (
        {"v1": 90, "v2": 10},
        {str(stable.pk): 90, str(canary.pk): 10},
    )
    assert (history.reason, history.actor, history.actor_label) == ("step 1", reviewer, "bob")
    event = AuditEvent.objects.get(action="traffic.changed")
    assert (event.before, event.after) == (
        {"traffic": {"v1": 100}},
        {"traffic": {"v1": 90, "v2": 10}},
    )
    assert (event.object_id, event.actor_label) == (str(churn.pk), "bob")
    # Left out of the split: back to 0. The system (actor None) is recorded as such.
    services.traffic_set(endpoint=churn.pk, split={stable.pk: 100}, actor=None, reason="abort")
    assert _weights(churn) == {1: 100, 2: 0, 3: 0}
    assert TrafficHistory.objects.latest("pk").actor_label == "system"
    assert AuditEvent.objects.filter(action="traffic.changed").count() == 2
    assert audit_verify().intact


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({}, "cannot be empty"),
        ([(1, 100)], "cannot be empty"),
        ("stable", "cannot be empty"),
        ({"one": 100}, "Deployment ids are integers"),
        ({"S": 90, "C": 20}, "add up to 110"),
        ({"S": 50, "C": 49}, "add up to 99"),
        ({"S": 110, "C": -10}, "integer 0 to 100"),
        ({"S": 50.0, "C": 50}, "integer 0 to 100"),
        ({"S": "50", "C": 50}, "integer 0 to 100"),
        ({"S": True, "C": 99}, "integer 0 to 100"),
        ({"S": 90, "R": 10}, "is retired; only live deployments take traffic"),
        ({"C": 100}, "gives no weight to the stable deployment"),
        ({"S": 0, "C": 100}, "gives no weight to the stable deployment"),
        ({"S": 90, "X": 10}, "is not a deployment of churn-staging"),
        ({"S": 90, 999999: 10}, "is not a deployment of churn-staging"),
    ],
)
def test_traffic_set_refuses_a_bad_split_and_changes_nothing(
    churn, stable_and_canary, data_scientist, reviewer, split, message
):
    stable, canary, retired = stable_and_canary
    elsewhere = Endpoint.objects.create(
        name="churn-production",
        environment=Environment.objects.get(name="production"),
        registered_model=churn.registered_model,
    )
    other = _deploy(elsewhere, 1, data_scientist, weight=100)
    ids = {"S": stable.pk, "C": canary.pk, "R": retired.pk, "X": other.pk}
    if isinstance(split, dict):
        split = {ids.get(k, k): v for k, v in split.items()}
    events = AuditEvent.objects.count()
    with pytest.raises(ValidationError, match=message):
        services.traffic_set(endpoint=churn, split=split, actor=reviewer, reason="try")
    assert _weights(churn) == {1: 100, 2: 0, 3: 0}
    assert (TrafficHistory.objects.count(), AuditEvent.objects.count()) == (0, events)


def test_traffic_set_refuses_an_endpoint_without_stable_or_a_blank_reason(
    churn, stable_and_canary, reviewer
):
    stable, canary, _ = stable_and_canary
    with pytest.raises(ValidationError, match="Say why"):
        services.traffic_set(endpoint=churn, split={stable.pk: 100}, actor=reviewer, reason=" ")
    Deployment.objects.filter(pk=stable.pk).update(status=Deployment.Status.RETIRED)
    with pytest.raises(ValidationError, match="has no live stable deployment"):
        services.traffic_set(endpoint=churn, split={canary.pk: 100}, actor=reviewer, reason="x")
    assert TrafficHistory.objects.count() == 0


# --- (c) "what served when" reads the traffic history -------------------------------------


def test_the_timeline_reads_the_traffic_history(churn, stable_and_canary, reviewer):
    stable, canary, _ = stable_and_canary
    services.traffic_set(
        endpoint=churn, split={stable.pk: 90, canary.pk: 10}, actor=reviewer, reason="step"
    )
    services.traffic_set(endpoint=churn, split={stable.pk: 100}, actor=None, reason="abort")
    # The audit trail is not what the timeline parses any more.
    AuditEvent.objects.filter(action="traffic.changed").update(after={"traffic": {"v9": 100}})
    timeline = selectors.traffic_timeline(churn)
    assert [(row["traffic"], row["actor"]) for row in timeline] == [
        ({"v1": 90, "v2": 10}, "bob"),
        ({"v1": 100}, "system"),
    ]
    first, second = TrafficHistory.objects.order_by("pk")
    assert (timeline[0]["start"], timeline[0]["end"]) == (first.created_at, second.created_at)
    assert (timeline[1]["start"], timeline[1]["end"]) == (second.created_at, None)


def test_the_migration_backfills_history_from_audit_events(churn, stable_and_canary, reviewer):
    """Endpoints whose traffic changed before the history existed keep their timeline: the
    rows come from the ``traffic.changed`` events, with their times and actors."""
    stable, canary, _ = stable_and_canary
    for actor, before, after in [
        (None, {}, {"v1": 100}),
        (reviewer, {"v1": 100}, {"v1": 80, "v2": 20}),
    ]:
        audit_record(
            actor=actor,
            action="traffic.changed",
            obj=churn,
            before={"traffic": before},
            after={"traffic": after},
        )
    events = list(AuditEvent.objects.filter(action="traffic.changed").order_by("id"))
    migration = importlib.import_module("rollouts.migrations.0011_backfill_traffic_history")
    migration.backfill_history(apps, None)
    migration.backfill_history(apps, None)  # again: nothing more
    timeline = selectors.traffic_timeline(churn)
    assert timeline == [
        {
            "start": events[0].created_at,
            "end": events[1].created_at,
            "traffic": {"v1": 100},
            "actor": "system",
        },
        {
            "start": events[1].created_at,
            "end": None,
            "traffic": {"v1": 80, "v2": 20},
            "actor": "bob",
        },
    ]
    rows = list(TrafficHistory.objects.order_by("pk"))
    assert [r.deployment_split for r in rows] == [
        {str(stable.pk): 100},
        {str(stable.pk): 80, str(canary.pk): 20},
    ]
    assert (rows[1].actor, rows[1].reason) == (reviewer, f"from audit event #{events[1].pk}")


# --- (d) monitoring plugs into rollouts through hooks -------------------------------------


def test_monitoring_registers_its_prediction_log_hook_at_start_up():
    from monitoring.rollups import mark_logged_rows
    from rollouts import hooks

    assert mark_logged_rows in hooks.prediction_logged_callbacks()


def test_the_log_writer_calls_the_registered_hooks(churn, stable_and_canary):
    from monitoring.models import StaleWindow
    from rollouts import hooks
    from rollouts.serving.logbuffer import LogBuffer

    stable = stable_and_canary[0]
    seen = []
    hooks.register_prediction_logged(seen.append)
    try:
        row = PredictionLog(
            endpoint=churn,
            model_version=stable.model_version,
            features={"x": 1},
            prediction=1,
            latency_ms=1.0,
            created_at=NOW,
        )
        LogBuffer().append([row])
    finally:
        hooks.unregister_prediction_logged(seen.append)
    assert seen == [[row]] and row.pk is not None
    # monitoring's own hook ran too: the row's hour is stale for the rollups.
    assert StaleWindow.objects.filter(endpoint=churn, model_version=stable.model_version).exists()


# --- (f) a rollout per approved request -------------------------------------------------


def _rollout_summary(req):
    rollout = Rollout.objects.get(request=req)
    steps = [
        (s.index, s.planned_weight, s.started_at is not None, s.ended_at is not None, s.verdict)
        for s in rollout.steps.order_by("index")
    ]
    return rollout, steps


def test_a_direct_deploy_is_a_one_step_rollout(synced, deploy, reviewer):
    v1, v2 = synced
    first = deploy(v1, "staging")
    rollout, steps = _rollout_summary(first)
    assert (rollout.strategy, rollout.state) == ("direct", Rollout.State.SUCCEEDED)
    assert rollout.started_at <= rollout.ended_at
    assert steps == [(0, 100, True, True, "")]  # no analysis in a direct step
    # The traffic change names the step that made it; a rollback names none.
    assert TrafficHistory.objects.get(endpoint=first.endpoint).rollout_step == rollout.steps.get()
    Environment.objects.filter(name="staging").update(metric_tolerance=0.1)
    second = deploy(v2, "staging")
    services.deployment_rollback(endpoint_id=first.endpoint_id, actor=reviewer, reason="errors")
    history = list(
        TrafficHistory.objects.order_by("pk").values_list(
            "rollout_step__rollout__request", flat=True
        )
    )
    assert history == [first.pk, second.pk, None]
    assert Rollout.objects.get(request=second).state == Rollout.State.SUCCEEDED


def test_a_failed_deploy_aborts_its_rollout(synced, awaiting_review, reviewer, monkeypatch,
                                            django_capture_on_commit_callbacks):  # fmt: skip
    v1, _ = synced
    req = awaiting_review(v1)
    assert not Rollout.objects.filter(request=req).exists()  # not approved yet

    def broken(model_version):
        raise RuntimeError("smoke test failed: predict raised ValueError: boom")

    monkeypatch.setattr(services, "_smoke_test", broken)
    with django_capture_on_commit_callbacks(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    req.refresh_from_db()
    assert req.status == DeploymentRequest.Status.FAILED
    rollout, steps = _rollout_summary(req)
    assert (rollout.state, rollout.state_reason) == (Rollout.State.ABORTED, req.status_reason)
    assert steps == [(0, 100, True, True, "")]
    assert not TrafficHistory.objects.exists()


def test_cancelling_an_approved_request_aborts_its_rollout(
    synced, awaiting_review, reviewer, data_scientist, django_capture_on_commit_callbacks
):
    v1, _ = synced
    req = awaiting_review(v1)
    with django_capture_on_commit_callbacks(execute=False):  # the deploy task never runs
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    rollout, steps = _rollout_summary(req)
    assert (rollout.state, steps) == (Rollout.State.PENDING, [(0, 100, False, False, "")])
    services.deployment_request_cancel(request_id=req.pk, actor=data_scientist)
    rollout, steps = _rollout_summary(req)
    assert (rollout.state, rollout.state_reason) == (Rollout.State.ABORTED, "cancelled by alice")
    assert rollout.ended_at is not None and steps == [(0, 100, False, False, "")]


def test_a_finished_rollout_cannot_move_and_steps_are_checked_by_the_database(
    churn, data_scientist
):
    version = ModelVersion.objects.get(registered_model=churn.registered_model, version=1)
    req = DeploymentRequest.objects.create(
        model_version=version,
        endpoint=churn,
        justification="x",
        requester=data_scientist,
        status=DeploymentRequest.Status.APPROVED,
    )
    rollout = services.rollout_plan(req)
    assert services.rollout_plan(req) == rollout and rollout.steps.count() == 1  # once
    services._rollout_transition(rollout, Rollout.State.PROGRESSING)
    services._rollout_transition(rollout, Rollout.State.SUCCEEDED)
    for state in (Rollout.State.PROGRESSING, Rollout.State.PAUSED, Rollout.State.ABORTED):
        with pytest.raises(services.InvalidTransition, match="succeeded; it cannot become"):
            services._rollout_transition(rollout, state)
    assert Rollout.objects.get(pk=rollout.pk).state == Rollout.State.SUCCEEDED
    for index, weight in [(1, 0), (1, 101), (0, 50)]:  # out of 1..100; index taken
        with pytest.raises(IntegrityError), transaction.atomic():
            RolloutStep.objects.create(rollout=rollout, index=index, planned_weight=weight)


def test_traffic_set_refuses_a_step_of_another_endpoints_rollout(
    churn, stable_and_canary, data_scientist
):
    other = Endpoint.objects.create(
        name="churn-production",
        environment=Environment.objects.get(name="production"),
        registered_model=churn.registered_model,
    )
    version = ModelVersion.objects.get(registered_model=churn.registered_model, version=1)
    req = DeploymentRequest.objects.create(
        model_version=version, endpoint=other, justification="x", requester=data_scientist
    )
    step = services.rollout_plan(req).steps.get()
    with pytest.raises(ValidationError, match="is not a step of a rollout on churn-staging"):
        services.traffic_set(
            endpoint=churn,
            split={stable_and_canary[0].pk: 100},
            actor=None,
            reason="x",
            rollout_step=step,
        )
    assert not TrafficHistory.objects.exists()


@pytest.mark.parametrize("model", ["rollout", "rolloutstep", "traffichistory"])
def test_the_admin_lists_rollouts_steps_and_history_read_only(
    model, synced, deploy, client, platform_admin
):
    v1, _ = synced
    deploy(v1, "staging")
    client.force_login(platform_admin)
    assert client.get(f"/admin/rollouts/{model}/").status_code == 200
    assert client.get(f"/admin/rollouts/{model}/add/").status_code == 403

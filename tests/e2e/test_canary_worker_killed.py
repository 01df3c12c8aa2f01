"""A canary whose worker is SIGKILLed during a step ends consistent once a new worker starts
(issue 10, fault check): finished, with exactly one traffic change and one audit event per
step.

v1 is stable on staging, and v1's model trained again (v2) is its canary, steps 20/50/100, with
labelled traffic over real HTTP. A worker of the test's own, in a process group of its own, is
sent ``advance_rollout`` for the due step while the test holds the request's row lock (as a
person's control would, for a moment): the worker claims the rollout (``lease_owner`` in the
database, committed) and cannot write its verdict before the kill (``_settle`` waits for that
lock). As soon as the claim is seen it is SIGKILLed, whole group, holding the claim; its
message is unacked and Redis would give it back only after an hour. Nobody else may take the
rollout while the claim (``ROLLOUT_LEASE_S``, a few seconds here) runs; once it has lapsed, a
new worker, sent the task as beat does for ``rollouts_due``, reclaims it and the rollout goes
on to the end. A duplicated task afterwards changes nothing.
"""

from __future__ import annotations

import re
import time

import pytest
from django.db import transaction
from django.db.models import Count, Sum
from django.utils import timezone

from portal.models import AuditEvent
from rollouts.executor import rollout_advance, rollouts_due
from rollouts.gates import METRICS_WITHIN_TOLERANCE
from rollouts.models import (
    Deployment,
    DeploymentRequest,
    Environment,
    Rollout,
    TrafficHistory,
)
from rollouts.tasks import advance_rollout
from tests.e2e.test_canary_rollout_e2e import Client, register_versions
from tests.e2e.test_deploy_redispatch import _wait_for, hanging_mlflow, workers  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, serialized_rollback=True)]

MODEL = "breast-cancer-canary-kill"
#: v2 is v1's model trained again: a good canary, which the analysis passes.
KINDS = {1: "logistic", 2: "logistic"}
PARAMS = {"steps": [20, 50, 100], "interval_s": 5, "max_extensions": 5}
POLICY = {"min_requests": 10, "min_labels": 10, "p95_tolerance": 1.0}
LEASE_S = 3
Status = DeploymentRequest.Status


@pytest.fixture
def versions(mlflow_store, team):
    return register_versions(mlflow_store, MODEL, KINDS)


@pytest.fixture
def staging(db):
    env = Environment.objects.get(name="staging")
    env.analysis_policy = POLICY
    env.gates = [g for g in env.gates if g != METRICS_WITHIN_TOLERANCE]
    env.allowed_strategies = ["direct", "canary"]
    env.save(update_fields=["analysis_policy", "gates", "allowed_strategies"])
    return env


def _live_split(endpoint) -> dict[int, int]:
    """Weights of the endpoint's live deployments by version, asserted to add up to 100, with
    exactly one live stable."""
    live = Deployment.objects.filter(endpoint=endpoint, status=Deployment.Status.LIVE)
    split = dict(live.filter(traffic_weight__gt=0).values_list("model_version__version",
                                                                "traffic_weight"))  # fmt: skip
    assert live.aggregate(t=Sum("traffic_weight"))["t"] == 100, split
    assert live.filter(role=Deployment.Role.STABLE).count() == 1
    return split


def _ledger(req, rollout) -> dict:
    """What the rollout wrote: traffic rows per step, audit events per kind."""
    per_step = dict(
        TrafficHistory.objects.filter(rollout_step__rollout=rollout)
        .values_list("rollout_step__index")
        .annotate(n=Count("id"))
    )
    on_request = dict(
        AuditEvent.objects.filter(object_type="rollouts.DeploymentRequest", object_id=str(req.pk))
        .values_list("action")
        .annotate(n=Count("id"))
    )
    return {
        "traffic_rows_per_step": per_step,
        "traffic_rows": TrafficHistory.objects.filter(endpoint=req.endpoint).count(),
        "traffic_changed": AuditEvent.objects.filter(
            action="traffic.changed",
            object_type="rollouts.Endpoint",
            object_id=str(req.endpoint_id),
        ).count(),
        "request_events": on_request,
        "steps": list(
            rollout.steps.order_by("index").values_list(
                "index", "verdict", "started_at", "ended_at"
            )
        ),  # fmt: skip
        "rollout": Rollout.objects.filter(pk=rollout.pk)
        .values_list("state", "next_check_at", "lease_owner")
        .get(),  # fmt: skip
    }


def _succeeded(log) -> int:
    return len(re.findall(rb"advance_rollout\[[^\]]+\] succeeded", log.read_bytes()))


def test_a_canary_whose_worker_is_killed_mid_step_ends_consistent_after_a_new_worker(
    live_server,
    staging,
    versions,
    deploy,
    workers,  # noqa: F811 (the fixture imported above)
    settings,
):
    settings.SERVING_ROUTE_TTL_S = 0.5
    settings.ROLLOUT_LEASE_S = LEASE_S
    stable = deploy(versions[1], "staging")
    assert stable.status == Status.LIVE, stable.status_reason
    req = deploy(versions[2], "staging", strategy="canary", strategy_params=PARAMS)
    assert req.status == Status.ROLLING_OUT, req.status_reason
    rollout = Rollout.objects.get(request=req)
    client = Client(live_server, req.endpoint)
    assert _live_split(req.endpoint) == {1: 80, 2: 20}

    # Step 1 gets enough labelled canary answers to be judged, and becomes due.
    served: dict[str, int] = {}
    deadline = time.monotonic() + 60
    while served.get("2", 0) < 2 * POLICY["min_labels"] or rollout.pk not in rollouts_due():
        assert time.monotonic() < deadline, served
        for version, n in client.labelled_round(10).items():
            served[version] = served.get(version, 0) + n

    doomed = workers("doomed-worker", hang=False, ROLLOUT_LEASE_S=str(LEASE_S))
    with transaction.atomic():
        # The request's row lock, as a person's control holds it for a moment: the worker's
        # verdict waits for it in _settle: the kill comes with the claim taken and nothing else.
        DeploymentRequest.objects.select_for_update().get(pk=req.pk)
        with workers.through_broker():
            advance_rollout.delay(rollout.pk)
        _wait_for(
            lambda: Rollout.objects.filter(pk=rollout.pk).exclude(lease_owner="").exists(),
            30,
            "the worker to claim the rollout",
            doomed.log,
        )
        doomed.kill()
        claimed = Rollout.objects.get(pk=rollout.pk)
    assert claimed.lease_until > timezone.now()
    # The dead worker's claim holds: beat does not send the rollout, nothing moved.
    assert rollout.pk not in rollouts_due()
    before = _ledger(req, rollout)
    assert before["traffic_rows_per_step"] == {0: 1}
    assert [(i, v, e) for i, v, _, e in before["steps"]][0] == (0, "", None)
    assert _live_split(req.endpoint) == {1: 80, 2: 20}
    assert _succeeded(doomed.log) == 0

    successor = workers("successor-worker", hang=False, ROLLOUT_LEASE_S=str(LEASE_S))
    deadline = time.monotonic() + 60
    sent = 0
    while DeploymentRequest.objects.get(pk=req.pk).status == Status.ROLLING_OUT:
        if time.monotonic() > deadline:
            pytest.fail(f"stuck: {_ledger(req, rollout)}\n{successor.log.read_text()[-3000:]}")
        for version, n in client.labelled_round(10).items():
            served[version] = served.get(version, 0) + n
        _live_split(req.endpoint)
        with workers.through_broker():
            for pk in rollouts_due():  # what beat's advance_rollouts sends
                advance_rollout.delay(pk)
                sent += 1
    # The dead worker's claim was lapsed before anyone took the rollout again.
    first_judged = Rollout.objects.get(pk=rollout.pk).steps.get(index=0).ended_at
    assert first_judged >= claimed.lease_until

    req.refresh_from_db()
    rollout.refresh_from_db()
    assert req.status == Status.LIVE, (req.status, req.status_reason)
    assert rollout.state == Rollout.State.SUCCEEDED, rollout.state_reason
    assert rollout.lease_owner == "" and rollout.next_check_at is None
    assert _live_split(req.endpoint) == {2: 100}
    assert Deployment.objects.get(request=stable).status == Deployment.Status.RETIRED
    after = _ledger(req, rollout)
    verdicts = [(i, v) for i, v, *_ in after["steps"]]
    assert verdicts == [(0, "pass"), (1, "pass"), (2, "")], after
    assert all(s is not None and e is not None for *_, s, e in after["steps"]), after
    # One traffic change per step (v1's own deploy wrote the endpoint's first row), each with
    # its one audit event; one start and one promotion of the request.
    assert after["traffic_rows_per_step"] == {0: 1, 1: 1, 2: 1}, after
    assert after["traffic_rows"] == 1 + 3 and after["traffic_changed"] == 1 + 3, after
    events = after["request_events"]
    assert events.get("rollout.started") == 1 and events.get("deployment.live") == 1, events
    assert not {"rollout.aborted", "rollout.awaiting_person"} & set(events), events

    # A duplicated task, through the worker and in-process, changes nothing.
    done = _succeeded(successor.log)
    with workers.through_broker():
        advance_rollout.delay(rollout.pk)
    _wait_for(lambda: _succeeded(successor.log) > done, 30, "the duplicate", successor.log)
    assert rollout_advance(rollout_id=rollout.pk).state == Rollout.State.SUCCEEDED
    assert _ledger(req, rollout) == after
    assert _live_split(req.endpoint) == {2: 100}
    assert successor.process.poll() is None and sent >= 2

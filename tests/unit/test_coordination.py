"""Coordination through the database: leases shared by every worker, deployments whose worker
died re-dispatched from the database, and the give-up after too many abandoned attempts."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.core.exceptions import PermissionDenied
from django.db import connection, connections
from django.utils import timezone

from portal import leases
from portal.models import AuditEvent, Lease
from rollouts import services, tasks
from rollouts.models import Deployment, DeploymentRequest

Status = DeploymentRequest.Status
MINUTE = timedelta(minutes=1)


# --- leases ----------------------------------------------------------------------------------


def test_a_lease_has_one_holder_until_it_expires(db):
    assert leases.lease_acquire(name="job", holder="w1", ttl=MINUTE)
    assert not leases.lease_acquire(name="job", holder="w2", ttl=MINUTE)
    assert leases.lease_acquire(name="job", holder="w1", ttl=MINUTE)  # renewal by its holder
    Lease.objects.filter(name="job").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert leases.lease_acquire(name="job", holder="w2", ttl=MINUTE)  # w1 died: taken over
    assert not leases.lease_release(name="job", holder="w1")
    assert Lease.objects.get(name="job").holder == "w2"
    assert leases.lease_release(name="job", holder="w2")
    assert leases.lease_acquire(name="job", holder="w3", ttl=MINUTE)


def test_leased_releases_only_what_it_got(db):
    leases.lease_acquire(name="job", holder="other", ttl=MINUTE)
    with leases.leased("job", ttl=MINUTE) as held:
        assert not held
    assert Lease.objects.get(name="job").holder == "other"
    with leases.leased("free", ttl=MINUTE) as held:
        assert held
        assert Lease.objects.filter(name="free").exists()
    assert not Lease.objects.filter(name="free").exists()


@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_concurrent_claimants_get_one_lease():
    """Eight threads (eight database connections) race for a new name, then for a lapsed one:
    exactly one wins each time. Meant for PostgreSQL (CI); SQLite serialises writers anyway."""
    if connection.vendor == "sqlite":
        pytest.skip("SQLite serialises writes; the race needs PostgreSQL")

    def race(name: str) -> list[str]:
        barrier, winners = threading.Barrier(8), []

        def claim(i: int) -> None:
            try:
                barrier.wait()
                if leases.lease_acquire(name=name, holder=f"w{i}", ttl=MINUTE):
                    winners.append(f"w{i}")
            finally:
                connections.close_all()

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return winners

    assert len(race("new")) == 1
    Lease.objects.filter(name="new").update(expires_at=timezone.now() - timedelta(seconds=1))
    assert len(race("new")) == 1


def test_monitoring_tasks_skip_while_another_worker_holds_the_lease(db):
    """The lock is seen by every process (it lives in the database, not a per-process cache)."""
    from monitoring import tasks as monitoring_tasks

    leases.lease_acquire(name="monitoring:refresh-rollups", holder="other-worker", ttl=MINUTE)
    leases.lease_acquire(name="monitoring:evaluate-alerts", holder="other-worker", ttl=MINUTE)
    assert monitoring_tasks.refresh_rollups() == {"skipped": 1}
    assert monitoring_tasks.evaluate_alerts() == {"skipped": 1}
    Lease.objects.update(expires_at=timezone.now() - timedelta(seconds=1))  # that worker died
    assert "hours" in monitoring_tasks.refresh_rollups()
    assert "skipped" not in monitoring_tasks.evaluate_alerts()
    assert not Lease.objects.exists()  # released after the run


# --- deployments whose worker died ----------------------------------------------------------------


@pytest.fixture
def deploying(awaiting_review, reviewer, synced, django_capture_on_commit_callbacks):
    """A request claimed by a deploy task whose worker then died (nothing else ran)."""
    req = awaiting_review(synced[0])
    with django_capture_on_commit_callbacks():  # the deploy task is not sent: the worker dies
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    services._deployment_begin(req.pk)
    req.refresh_from_db()
    assert (req.status, req.deploy_attempts) == (Status.DEPLOYING, 1)
    assert req.deploy_lease_until > timezone.now()
    return req


def _lapse(req: DeploymentRequest) -> None:
    DeploymentRequest.objects.filter(pk=req.pk).update(
        deploy_lease_until=timezone.now() - timedelta(seconds=1)
    )


def test_a_second_delivery_leaves_a_claimed_deploy_alone(deploying):
    assert tasks.execute_deployment.apply(args=[deploying.pk]).get() == Status.DEPLOYING
    assert services.deployment_requests_redispatch(older_than=timedelta(0)) == []
    deploying.refresh_from_db()
    assert deploying.deploy_attempts == 1


def test_beat_redispatches_a_deploy_whose_lease_lapsed(deploying, monkeypatch):
    sent = []
    monkeypatch.setattr(tasks.execute_deployment, "delay", lambda *a: sent.append(a))
    _lapse(deploying)
    assert services.deployment_requests_redispatch() == [deploying.pk]
    assert sent == [(deploying.pk,)]

    assert tasks.execute_deployment.apply(args=[deploying.pk]).get() == Status.LIVE
    deploying.refresh_from_db()
    assert deploying.deploy_attempts == 2
    assert Deployment.objects.get(request=deploying).status == Deployment.Status.LIVE
    assert AuditEvent.objects.filter(action="deployment.reclaimed").count() == 1


def test_a_deploy_abandoned_too_often_fails_and_frees_the_version(
    deploying, settings, awaiting_review, synced
):
    settings.DEPLOY_MAX_ATTEMPTS = 2
    DeploymentRequest.objects.filter(pk=deploying.pk).update(deploy_attempts=2)
    _lapse(deploying)
    assert services.deployment_requests_redispatch() == [deploying.pk]
    deploying.refresh_from_db()
    assert deploying.status == Status.FAILED
    assert "abandoned 2 times" in deploying.status_reason
    assert AuditEvent.objects.filter(action="deployment.failed").count() == 1
    assert services.deployment_requests_redispatch() == []  # once
    again = awaiting_review(synced[0])  # a new request for that version can be opened
    assert again.status == Status.AWAITING_REVIEW


def test_the_task_itself_gives_up_after_too_many_attempts(deploying, settings):
    settings.DEPLOY_MAX_ATTEMPTS = 1
    _lapse(deploying)
    assert tasks.execute_deployment.apply(args=[deploying.pk]).get() == Status.FAILED


@pytest.mark.parametrize("who", ["requester", "admin"])
def test_a_request_stuck_in_deploying_can_be_cancelled(
    deploying, data_scientist, platform_admin, client, who
):
    actor = data_scientist if who == "requester" else platform_admin
    client.force_login(actor)
    page = client.get(deploying.get_absolute_url()).content.decode()
    assert "Cancel request" in page
    services.deployment_request_cancel(request_id=deploying.pk, actor=actor)
    deploying.refresh_from_db()
    assert deploying.status == Status.CANCELLED
    assert Deployment.objects.get(request=deploying).status == Deployment.Status.FAILED
    assert AuditEvent.objects.filter(action="request.cancelled").count() == 1
    # A deploy task that was still running promotes nothing; beat leaves it alone.
    assert tasks.execute_deployment.apply(args=[deploying.pk]).get() == Status.CANCELLED
    assert services.deployment_requests_redispatch(older_than=timedelta(0)) == []
    assert not Deployment.objects.filter(status=Deployment.Status.LIVE).exists()


def test_a_stranger_cannot_cancel_a_deploying_request(deploying, reviewer):
    with pytest.raises(PermissionDenied):
        services.deployment_request_cancel(request_id=deploying.pk, actor=reviewer)

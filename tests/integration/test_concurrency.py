"""Race-safety of review decisions (DESIGN.md invariant): twenty reviewers deciding the same
request at the same instant give exactly one winner, one audit event and at most one Celery
launch; every loser gets a 409.

Each thread uses its own database connection, as concurrent web or worker processes would, so
these tests commit for real (``transaction=True``) and run on SQLite by default and on
PostgreSQL with ``DATABASE_URL=postgres://...``.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pytest
from django.db import connection
from django.test import Client

from portal.audit import audit_verify
from portal.errors import Conflict
from portal.models import AuditEvent
from registry import mlflow_client
from rollouts import services, tasks
from rollouts.models import DeploymentRequest, Review
from tests.factories import UserFactory

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, serialized_rollback=True)]

Status = DeploymentRequest.Status
THREADS = 20
DECISIONS = ("request.approved", "request.rejected")


@pytest.fixture
def reviewers(db) -> list:
    """Twenty distinct reviewers, created before any thread starts."""
    return [UserFactory(username=f"reviewer{i:02d}", roles=["reviewers"]) for i in range(THREADS)]


@pytest.fixture
def launches(monkeypatch) -> list[int]:
    """Request ids passed to ``execute_deployment.delay``: ``on_commit`` fires in whichever
    thread committed, so a double launch would show here as two calls."""
    calls: list[int] = []
    lock = threading.Lock()

    def delay(request_id: int) -> None:
        with lock:
            calls.append(request_id)

    monkeypatch.setattr(tasks.execute_deployment, "delay", delay)
    return calls


@pytest.fixture
def pending(synced, awaiting_review) -> DeploymentRequest:
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    assert req.status == Status.AWAITING_REVIEW, req.status_reason
    return req


def _race(workers: list[Callable[[], object]]) -> list[tuple[str, object]]:
    """Start every worker at the same instant (a barrier), each on its own database connection;
    returns ``("ok", result)`` or ``("error", exception)`` per worker, in order."""
    barrier = threading.Barrier(len(workers))
    outcomes: list[tuple[str, object]] = [("missing", None)] * len(workers)

    def run(index: int, work: Callable[[], object]) -> None:
        try:
            barrier.wait(timeout=60)
            outcomes[index] = ("ok", work())
        except BaseException as exc:  # noqa: B036 - report everything to the main thread
            outcomes[index] = ("error", exc)
        finally:
            connection.close()

    threads = [
        threading.Thread(target=run, args=(i, w), daemon=True) for i, w in enumerate(workers)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    return outcomes


def _assert_one_decision(req: DeploymentRequest, launches: list[int]) -> str:
    """Exactly one decision is in the database and the audit trail; returns it."""
    req.refresh_from_db()
    assert req.status in (Status.APPROVED, Status.REJECTED)
    assert Review.objects.filter(request=req).count() == 1
    events = AuditEvent.objects.filter(
        object_id=str(req.pk), object_type="rollouts.DeploymentRequest"
    )
    decided = list(events.filter(action__in=DECISIONS).values_list("action", flat=True))
    assert decided == [f"request.{req.status}"]
    assert not events.filter(action="request.approval_recorded").exists()
    assert launches == ([req.pk] if req.status == Status.APPROVED else [])
    report = audit_verify()
    assert report.intact, report
    return req.status


def _decide(req: DeploymentRequest, reviewer, index: int) -> Callable[[], object]:
    if index % 2 == 0:
        return lambda: services.deployment_request_approve(
            request_id=req.pk, reviewer=reviewer, comment="go"
        )
    return lambda: services.deployment_request_reject(
        request_id=req.pk, reviewer=reviewer, comment="stop"
    )


def _assert_one_winner(outcomes: list[tuple[str, object]]) -> None:
    kinds = Counter(kind for kind, _ in outcomes)
    errors = [value for kind, value in outcomes if kind == "error"]
    assert kinds["ok"] == 1, errors
    assert kinds["error"] == THREADS - 1
    unexpected = [e for e in errors if not isinstance(e, services.InvalidTransition)]
    assert not unexpected, unexpected
    assert all(isinstance(e, Conflict) for e in errors)  # 409 through the views and the API


def test_concurrent_approve_and_reject_through_the_services(
    pending, reviewers, launches, monkeypatch
):
    # Reading the artifacts takes long enough that every rejection would come first; with the
    # digest instant, approvals and rejections reach the row lock together.
    monkeypatch.setattr(
        mlflow_client, "artifact_digest", lambda name, version: pending.artifact_digest
    )
    outcomes = _race([_decide(pending, person, i) for i, person in enumerate(reviewers)])
    _assert_one_winner(outcomes)
    _assert_one_decision(pending, launches)


def test_concurrent_approvals_with_real_digest_checks(pending, reviewers, launches):
    outcomes = _race(
        [
            lambda person=person: services.deployment_request_approve(
                request_id=pending.pk, reviewer=person
            )
            for person in reviewers
        ]
    )
    _assert_one_winner(outcomes)
    assert _assert_one_decision(pending, launches) == Status.APPROVED
    assert len(launches) == 1


def test_concurrent_decisions_through_the_html_views(pending, reviewers, launches, monkeypatch):
    monkeypatch.setattr(
        mlflow_client, "artifact_digest", lambda name, version: pending.artifact_digest
    )
    clients = []
    for person in reviewers:
        client = Client()
        client.force_login(person)
        clients.append(client)
    url = f"/rollouts/requests/{pending.pk}/"

    def post(index: int) -> Callable[[], object]:
        action = "approve" if index % 2 == 0 else "reject"
        return lambda: (
            clients[index].post(url + action, {"comment": f"{action} from {index}"}).status_code
        )

    outcomes = _race([post(i) for i in range(THREADS)])
    assert all(kind == "ok" for kind, _ in outcomes), outcomes
    codes = Counter(code for _, code in outcomes)
    assert codes == Counter({302: 1, 409: THREADS - 1}), codes
    _assert_one_decision(pending, launches)

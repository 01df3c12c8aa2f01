"""A deploy whose whole Celery worker is killed is re-dispatched from the database (issue 9,
point 8).

A real worker claims an approved request (``deploying``, a lease in the database) and hangs in
its smoke test on an MLflow server that accepts connections and never answers; the worker's
process group is then SIGKILLed, as the OOM killer or a lost host would. Its message is unacked
and the broker gives it back only after its visibility timeout (an hour on Redis), or never; the
request must not stay ``deploying`` for good. Once the lease (``DEPLOY_TIME_LIMIT_S`` +
``DEPLOY_LEASE_MARGIN_S``, a few seconds here) lapses, beat's ``redispatch_stalled``
(``services.deployment_requests_redispatch``, called here through the broker) queues the deploy
again: a new worker reclaims it and the version goes live once, or, after
``DEPLOY_MAX_ATTEMPTS`` abandoned claims, the request is failed with the reason and the version
can be requested again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from portal import celery_app
from portal.models import AuditEvent
from rollouts import services
from rollouts.models import Deployment, DeploymentRequest, Environment
from tests.conftest import ROOT, _test_database_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, serialized_rollback=True)]

Status = DeploymentRequest.Status
#: The killed workers' claim: DEPLOY_TIME_LIMIT_S + DEPLOY_LEASE_MARGIN_S seconds.
SHORT_LEASE = {"DEPLOY_TIME_LIMIT_S": "2", "DEPLOY_LEASE_MARGIN_S": "1"}
#: A prefork pool enforces the time limits, the soft one (DEPLOY_TIME_LIMIT_S - 15 s) raising in
#: the hung smoke test and failing the deploy: it must come well after the kill.
PREFORK_LEASE = {"DEPLOY_TIME_LIMIT_S": "25", "DEPLOY_LEASE_MARGIN_S": "1"}


def _wait_for(predicate: Callable[[], object], timeout: float, what: str, *logs: Path) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")


def _pool_children(pid: int) -> set[int]:
    """Pids of the live (not zombie) child processes of ``pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            except OSError:
                continue
            if int(ppid) == pid and state != "Z":
                found.add(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Worker:
    """``celery -A portal worker -P <pool>`` on the test database, consuming only ``queue``, in
    a process group of its own so that ``kill()`` takes the whole worker down at once."""

    def __init__(
        self, *, queue: str, broker: str, mlflow_uri: str, log: Path, pool: str, **env: str
    ):
        self.log = log
        environ = {
            **os.environ,
            "DATABASE_URL": _test_database_url(),
            "CELERY_BROKER_URL": broker,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "MLFLOW_REGISTRY_URI": mlflow_uri,
            "SECRET_KEY": settings.SECRET_KEY,
            **env,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "portal",
                "worker",
                "-P",
                pool,
                "-c",
                "1",
                "-Q",
                queue,
                "-l",
                "INFO",
                "-n",
                f"{log.stem}-{os.getpid()}@%h",
                "--without-heartbeat",
                "--without-gossip",
                "--without-mingle",
            ],
            cwd=ROOT,
            env=environ,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self) -> None:
        def ready() -> bool:
            if self.process.poll() is not None:
                pytest.fail(f"{self.log.stem} exited:\n{self.log.read_text()[-4000:]}")
            return b"ready." in self.log.read_bytes()

        _wait_for(ready, 60, f"{self.log.stem} to start", self.log)

    def kill(self) -> None:
        """SIGKILL the worker's whole process group and reap its main process."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def kill_main(self) -> None:
        """SIGKILL the worker's main process only, and reap it."""
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:  # still in a hung task
                pass
        self.kill()  # and whatever of its group is left


@pytest.fixture
def hanging_mlflow() -> Iterator[str]:
    """An MLflow tracking URI whose server accepts connections (the kernel's backlog) and never
    answers: a deploy's smoke test blocks there, past any test's patience."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture
def workers(mlflow_store, hanging_mlflow, tmp_path, tmp_path_factory):
    """``workers(name, hang=..., pool="solo", **env)`` starts a worker on this test's own queue; tasks
    sent inside ``workers.through_broker()`` go there instead of running in-process."""
    broker = os.environ.get("CELERY_BROKER_URL") or (
        f"sqla+sqlite:///{tmp_path_factory.mktemp('broker') / 'broker.sqlite'}"
    )
    queue = f"rollgate-redispatch-{os.getpid()}-{time.monotonic_ns()}"
    saved = celery_app.conf.broker_url, celery_app.conf.task_default_queue
    broker_changed = celery_app.conf.broker_url != broker
    celery_app.conf.broker_url, celery_app.conf.task_default_queue = broker, queue
    if broker_changed and celery_app._pool is not None:  # see conftest.celery_worker_process
        celery_app._pool.force_close_all()
        celery_app._pool = None
    celery_app.__dict__.pop("amqp", None)  # the routing to the default queue is cached
    started: list[Worker] = []

    def start(name: str, *, hang: bool, pool: str = "solo", **env: str) -> Worker:
        worker = Worker(
            queue=queue,
            broker=broker,
            mlflow_uri=hanging_mlflow if hang else mlflow_store["tracking_uri"],
            log=tmp_path / f"{name}.log",
            pool=pool,
            **env,
        )
        started.append(worker)
        worker.wait_ready()
        return worker

    @contextlib.contextmanager
    def through_broker() -> Iterator[None]:
        celery_app.conf.task_always_eager = False
        try:
            yield
        finally:
            celery_app.conf.task_always_eager = True

    start.through_broker = through_broker
    start.logs = lambda: [w.log for w in started]
    yield start
    for worker in started:
        worker.stop()
    celery_app.control.purge()  # what no worker took (a notification after the last kill)
    if broker_changed and celery_app._pool is not None:
        celery_app._pool.force_close_all()
        celery_app._pool = None
    celery_app.conf.broker_url, celery_app.conf.task_default_queue = saved
    celery_app.__dict__.pop("amqp", None)


@pytest.fixture
def approve(workers, reviewer, second_reviewer):
    """``approve(req)``: every approval the environment needs; the deploy goes to the broker."""

    def _approve(req: DeploymentRequest) -> None:
        needed = req.endpoint.environment.required_approvals
        with workers.through_broker():
            for person in (reviewer, second_reviewer)[:needed]:
                services.deployment_request_approve(request_id=req.pk, reviewer=person)

    return _approve


def _request(req: DeploymentRequest) -> DeploymentRequest:
    return DeploymentRequest.objects.get(pk=req.pk)


def _claimed(req: DeploymentRequest, attempt: int, workers) -> DeploymentRequest:
    """Wait until the request is ``deploying`` under its ``attempt``-th claim."""
    return _wait_for(
        lambda: DeploymentRequest.objects.filter(
            pk=req.pk, status=Status.DEPLOYING, deploy_attempts=attempt
        ).first(),
        60,
        f"request #{req.pk} to be claimed (attempt {attempt})",
        *workers.logs(),
    )


def _lease_lapsed(req: DeploymentRequest, workers) -> None:
    _wait_for(
        lambda: DeploymentRequest.objects.filter(
            pk=req.pk, deploy_lease_until__lte=timezone.now()
        ).exists(),
        30,
        f"the lease of request #{req.pk} to lapse",
        *workers.logs(),
    )


def _redispatch(workers) -> list[int]:
    """What beat's ``redispatch_stalled`` does, its tasks sent through the broker."""
    with workers.through_broker():
        return services.deployment_requests_redispatch()


@pytest.mark.parametrize("pool", ["solo", "prefork"])
def test_a_deploy_whose_worker_was_killed_goes_live_once_after_redispatch(
    synced, awaiting_review, approve, workers, data_scientist, pool
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    assert req.status == Status.AWAITING_REVIEW, req.status_reason
    lease = SHORT_LEASE if pool == "solo" else PREFORK_LEASE
    hung = workers("hung-worker", hang=True, pool=pool, **lease)
    approve(req)
    claim = _claimed(req, 1, workers)
    lease_s = int(lease["DEPLOY_TIME_LIMIT_S"]) + int(lease["DEPLOY_LEASE_MARGIN_S"])
    # The worker's own settings set its claim (updated_at is written a moment after "now").
    assert abs(claim.deploy_lease_until - claim.updated_at - timedelta(seconds=lease_s)) < (
        timedelta(seconds=1)
    )
    if pool == "solo":
        hung.kill()
    else:
        # SIGKILL of the main process only: its pool process, which runs the deploy, goes
        # with it (Celery sets PR_SET_PDEATHSIG on it), so nothing finishes the deploy.
        children = _pool_children(hung.process.pid)
        assert len(children) == 1
        hung.kill_main()
        _wait_for(lambda: not any(map(_alive, children)), 10, "the pool process to die")
    assert _request(req).status == Status.DEPLOYING  # nobody else will finish it

    healthy = workers("healthy-worker", hang=False)
    _lease_lapsed(req, workers)
    assert req.pk in _redispatch(workers)
    _wait_for(
        lambda: _request(req).status in (Status.LIVE, Status.FAILED),
        60,
        f"request #{req.pk} to finish",
        *workers.logs(),
    )
    done = _request(req)
    assert done.status == Status.LIVE, done.status_reason
    assert done.deploy_attempts == 2
    assert healthy.process.poll() is None
    # One deployment, live with all the traffic: the reclaim did not duplicate it.
    deployments = list(Deployment.objects.filter(request=req))
    assert [(d.status, d.traffic_weight) for d in deployments] == [(Deployment.Status.LIVE, 100)]
    assert Deployment.objects.filter(endpoint=done.endpoint, status="live").count() == 1
    reclaimed = AuditEvent.objects.filter(action="deployment.reclaimed", object_id=str(req.pk))
    assert reclaimed.count() == 1
    # Nothing is left to redispatch, and the live version cannot be requested again.
    assert req.pk not in _redispatch(workers)
    with pytest.raises(services.AlreadyLive):
        services.deployment_request_create(
            requester=data_scientist,
            model_version=v1,
            environment=Environment.objects.get(name="staging"),
            justification="again",
        )


def test_a_deploy_abandoned_max_attempts_times_is_failed_and_can_be_requested_again(
    synced, awaiting_review, approve, workers, data_scientist, settings
):
    settings.DEPLOY_MAX_ATTEMPTS = 2  # this process's redispatch gives up after two
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    first = workers("hung-worker-1", hang=True, DEPLOY_MAX_ATTEMPTS="2", **SHORT_LEASE)
    approve(req)
    _claimed(req, 1, workers)
    first.kill()

    second = workers("hung-worker-2", hang=True, DEPLOY_MAX_ATTEMPTS="2", **SHORT_LEASE)
    _lease_lapsed(req, workers)
    assert req.pk in _redispatch(workers)  # queued again: attempt 2 of 2
    _claimed(req, 2, workers)
    second.kill()

    _lease_lapsed(req, workers)
    assert _redispatch(workers) == [req.pk]  # failed here, with no worker alive
    failed = _request(req)
    assert failed.status == Status.FAILED
    assert failed.status_reason == (
        "the deployment was abandoned 2 times (its worker stopped before finishing); "
        "giving up after 2 attempts"
    )
    assert [d.status for d in Deployment.objects.filter(request=req)] == [Deployment.Status.FAILED]
    assert not Deployment.objects.filter(endpoint=failed.endpoint, status="live").exists()
    assert _redispatch(workers) == []  # once
    # The version can be requested again; its requester can withdraw the new request.
    again = awaiting_review(v1, "staging")
    assert again.pk != req.pk and again.status == Status.AWAITING_REVIEW, again.status_reason
    cancelled = services.deployment_request_cancel(request_id=again.pk, actor=data_scientist)
    assert cancelled.status == Status.CANCELLED

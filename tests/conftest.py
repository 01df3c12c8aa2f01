"""Shared fixtures: personas, a real MLflow store with two registered versions, and (for the
end-to-end tests) a real Celery worker process on the test database."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test import override_settings

from portal import celery_app
from portal.models import Team
from tests.factories import UserFactory

REGISTERED_MODEL = "breast-cancer-classifier"
TEAM = "diagnostics"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _close_stray_test_database_sessions(django_db_setup, django_db_blocker):
    """At the end of the session, before the test database is dropped, end the PostgreSQL
    sessions that other threads may still hold on it (after the browser tests, one of the live
    server's is left), so that the drop does not fail with "being accessed by other users"."""
    yield
    if connection.vendor != "postgresql":
        return
    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings):
    """Personas get passwords; the production hasher costs ~0.5 s per user."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _serving_state(settings):
    """Each test starts with empty routing and key tables, and writes the prediction log in
    the request (inside the test's transaction); tests of the buffered writer turn it on. A
    refresher thread that a test started (an ASGI lifespan startup) is stopped after it, so that
    it cannot swap tables or evict models under a later test."""
    from rollouts.serving.runtime import keys, refresher, router

    settings.SERVING_LOG_BUFFERED = False
    router.invalidate()
    keys.invalidate()
    yield
    refresher.stop()
    if refresher._thread is not None:
        refresher._thread.join(timeout=5)
    router.invalidate()
    keys.invalidate()


@pytest.fixture(autouse=True)
def _celery_eager():
    """Unit tests run tasks in-process; the e2e fixture below turns this off."""
    celery_app.conf.task_always_eager = True
    celery_app.conf.task_eager_propagates = True
    yield


# --- personas -----------------------------------------------------------------------------


@pytest.fixture
def team(db):
    """The team that owns ``breast-cancer-classifier`` (its MLflow tag ``team``)."""
    return Team.objects.get_or_create(slug=TEAM, defaults={"name": "Diagnostics"})[0]


@pytest.fixture
def other_team(db):
    return Team.objects.get_or_create(slug="research", defaults={"name": "Research"})[0]


@pytest.fixture
def data_scientist(team):
    user = UserFactory(username="alice", roles=["data scientists"])
    team.members.add(user)
    return user


@pytest.fixture
def other_data_scientist(other_team):
    """A data scientist of another team: sees none of ``team``'s models or requests."""
    user = UserFactory(username="erin", roles=["data scientists"])
    other_team.members.add(user)
    return user


@pytest.fixture
def reviewer(db):
    return UserFactory(username="bob", roles=["reviewers"])


@pytest.fixture
def second_reviewer(db):
    return UserFactory(username="frank", roles=["reviewers"])


@pytest.fixture
def manager(db):
    return UserFactory(username="carol", roles=["managers"])


@pytest.fixture
def platform_admin(db):
    return UserFactory(username="dana", roles=["platform admins"], is_staff=True, is_superuser=True)


@pytest.fixture
def outsider(db):
    return UserFactory(username="mallory", roles=[])


# --- MLflow -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def mlflow_store(tmp_path_factory):
    """A real MLflow tracking store (SQLite) and artifact root in a temporary folder, with
    ``breast-cancer-classifier`` v1 (logistic regression) and v2 (random forest) registered
    through the MLflow client. Settings point at it for the whole session."""
    from registry.demo_models import train_and_register

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.sqlite'}"
    override = override_settings(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_REGISTRY_URI=uri,
        MLFLOW_ARTIFACT_ROOT=(root / "artifacts").as_uri(),
    )
    override.enable()
    try:
        assert train_and_register("logistic", REGISTERED_MODEL) == 1
        assert train_and_register("forest", REGISTERED_MODEL) == 2
        yield {"tracking_uri": uri, "artifact_root": (root / "artifacts").as_uri(), "root": root}
    finally:
        override.disable()


@pytest.fixture
def synced(db, mlflow_store, team):
    """The registry mirrored from the MLflow store (owned by ``team``): returns (v1, v2)."""
    import mlflow

    from registry.models import ModelVersion
    from registry.services import registry_sync

    # The MLflow store lives for the whole session: aliases set by one test's deployments
    # must not leak into the next test's mirror.
    uri = mlflow_store["tracking_uri"]
    client = mlflow.MlflowClient(uri, registry_uri=uri)
    for alias in client.get_registered_model(REGISTERED_MODEL).aliases:
        client.delete_registered_model_alias(REGISTERED_MODEL, alias)
    registry_sync()
    versions = ModelVersion.objects.filter(registered_model__name=REGISTERED_MODEL)
    return tuple(versions.order_by("version"))


# --- a real Celery worker -----------------------------------------------------------------


def _test_database_url() -> str:
    s = connection.settings_dict
    if s["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{Path(s['NAME']).resolve()}"
    user = s.get("USER") or ""
    password = f":{s['PASSWORD']}" if s.get("PASSWORD") else ""
    auth = f"{user}{password}@" if user else ""
    return f"postgres://{auth}{s.get('HOST') or '127.0.0.1'}:{s.get('PORT') or 5432}/{s['NAME']}"


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, mlflow_store, tmp_path_factory):
    """A real ``celery worker`` subprocess on the test database and the session's MLflow store.

    The broker is ``CELERY_BROKER_URL`` when set (Redis in CI), else a SQLite file of its own.
    """
    broker = os.environ.get("CELERY_BROKER_URL") or (
        f"sqla+sqlite:///{tmp_path_factory.mktemp('broker') / 'broker.sqlite'}"
    )
    queue = f"rollgate-test-{os.getpid()}"
    broker_changed = celery_app.conf.broker_url != broker
    celery_app.conf.broker_url = broker
    celery_app.conf.task_default_queue = queue
    # Unit tests that ran earlier (pytest-django runs transactional tests last) sent tasks
    # eagerly, which cached the routing to the default queue and opened the producer pool on
    # the broker of that moment. Rebuild the routing; drop the pool only when the broker
    # changed (kombu keeps one producer pool per broker URL, so closing the pool of an
    # unchanged broker would leave kombu handing out a closed one).
    if broker_changed and celery_app._pool is not None:
        celery_app._pool.force_close_all()
        celery_app._pool = None
    celery_app.__dict__.pop("amqp", None)
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "CELERY_BROKER_URL": broker,
        "MLFLOW_TRACKING_URI": mlflow_store["tracking_uri"],
        "MLFLOW_ARTIFACT_ROOT": mlflow_store["artifact_root"],
        "SECRET_KEY": settings.SECRET_KEY,
    }
    log = tempfile.NamedTemporaryFile(prefix="celery-worker-", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "portal",
            "worker",
            "-P",
            "solo",
            "-Q",
            queue,
            "-l",
            "INFO",
            "-n",
            f"test-{os.getpid()}@%h",
            "--without-heartbeat",
            "--without-gossip",
            "--without-mingle",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    while b"ready." not in Path(log.name).read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("celery worker did not start:\n" + Path(log.name).read_text()[-4000:])
        time.sleep(0.3)
    yield {"process": proc, "log": Path(log.name)}
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.copy(log.name, ROOT / "var" / "test-celery-worker.log")
    os.unlink(log.name)


@pytest.fixture
def real_worker(celery_worker_process, transactional_db):
    """Tasks go through the broker to the worker process (not eager) for this test."""
    celery_app.conf.task_always_eager = False
    yield celery_worker_process
    celery_app.conf.task_always_eager = True


# --- the workflow, driven through the services ---------------------------------------------


@pytest.fixture
def deploy(django_capture_on_commit_callbacks, data_scientist, reviewer, second_reviewer):
    """``deploy(model_version, "staging")``: request (data scientist), run the gates, approve
    with as many distinct reviewers as the environment needs, and run the deployment, all
    in-process. Returns the request, refreshed."""
    from rollouts import services
    from rollouts.models import Environment

    def _deploy(
        model_version,
        environment: str = "staging",
        *,
        justification: str = "test",
        strategy: str = "direct",
        strategy_params: dict | None = None,
    ):
        env = Environment.objects.get(name=environment)
        with django_capture_on_commit_callbacks(execute=True):
            req = services.deployment_request_create(
                requester=data_scientist,
                model_version=model_version,
                environment=env,
                strategy=strategy,
                strategy_params=strategy_params,
                justification=justification,
            )
        req.refresh_from_db()
        assert req.status == "awaiting_review", (req.status, req.status_reason)
        for person in (reviewer, second_reviewer)[: env.required_approvals]:
            with django_capture_on_commit_callbacks(execute=True):
                services.deployment_request_approve(request_id=req.pk, reviewer=person)
        req.refresh_from_db()
        return req

    return _deploy


@pytest.fixture
def awaiting_review(django_capture_on_commit_callbacks, data_scientist):
    """``awaiting_review(model_version, "staging")``: a request whose gates have passed."""
    from rollouts import services
    from rollouts.models import Environment

    def _create(model_version, environment: str = "staging"):
        with django_capture_on_commit_callbacks(execute=True):
            req = services.deployment_request_create(
                requester=data_scientist,
                model_version=model_version,
                environment=Environment.objects.get(name=environment),
                justification="test",
            )
        req.refresh_from_db()
        return req

    return _create

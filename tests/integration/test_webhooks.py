"""MLflow registry webhooks into the portal.

Unit level, with Django's test client: the receiver's answers (202, 400, 401, 503) and that only
an accepted delivery sends ``sync_registry``, after commit. Real: an ``mlflow server`` subprocess
(SQL backend) delivers to the live portal, which mirrors a newly registered version with no
manual sync, and a forged delivery over HTTP changes nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from django.core.management import CommandError, call_command

from portal.models import AuditEvent
from registry import services, tasks
from registry.models import ModelVersion, RegisteredModel

SECRET = "webhook-secret-for-tests"
URL = "/registry/webhooks/mlflow"
REGISTRY_EVENTS = [
    ("registered_model", "created"),
    ("model_version", "created"),
    ("model_version_tag", "set"),
    ("model_version_tag", "deleted"),
    ("model_version_alias", "created"),
    ("model_version_alias", "deleted"),
]


def _sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow 3.17's ``mlflow.webhooks.delivery._generate_hmac_signature`` (which signs the
    UTF-8 encoding of the same string), restated so the tests do not reuse the code under test;
    bytes here, so that a non-UTF-8 body can be signed too."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def _payload(entity: str = "model_version", action: str = "created") -> dict[str, Any]:
    return {
        "entity": entity,
        "action": action,
        "timestamp": "2025-01-01T00:00:00+00:00",
        "data": {"name": "webhook-model", "version": "1"},
    }


def _delivery(
    payload: dict[str, Any] | bytes | None = None,
    *,
    secret: str = SECRET,
    age_s: int = 0,
) -> tuple[bytes, dict[str, str]]:
    """A body and the headers MLflow would send with it, signed with ``secret`` and stamped
    ``age_s`` seconds in the past."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload or _payload()).encode()
    delivery_id, timestamp = str(uuid.uuid4()), str(int(time.time()) - age_s)
    return body, {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": timestamp,
        "X-MLflow-Signature": _sign(secret, delivery_id, timestamp, body),
    }


def _post(client, body: bytes, headers: dict[str, str]):
    return client.post(URL, data=body, content_type="application/json", headers=headers)


def _counts() -> tuple[int, int, int]:
    return (
        RegisteredModel.objects.count(),
        ModelVersion.objects.count(),
        AuditEvent.objects.count(),
    )


@pytest.fixture
def webhook_secret(settings) -> str:
    settings.MLFLOW_WEBHOOK_SECRET = SECRET
    return SECRET


@pytest.fixture
def sent_syncs(monkeypatch) -> list[tuple[tuple, dict]]:
    """Calls of ``sync_registry.delay`` (args, kwargs), recorded instead of run."""
    calls: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(tasks.sync_registry, "delay", lambda *a, **kw: calls.append((a, kw)))
    return calls


# --- unit level ----------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(("entity", "action"), REGISTRY_EVENTS)
def test_signed_registry_event_is_accepted_and_sync_sent_on_commit(
    client, webhook_secret, sent_syncs, django_capture_on_commit_callbacks, entity, action
):
    body, headers = _delivery(_payload(entity, action))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _post(client, body, headers)
        assert sent_syncs == []  # not before the transaction commits
    assert response.status_code == 202
    assert response.json() == {"status": "accepted"}
    assert len(callbacks) == 1
    assert sent_syncs == [((), {})]


@pytest.mark.django_db
def test_one_matching_signature_among_several_is_enough(
    client, webhook_secret, sent_syncs, django_capture_on_commit_callbacks
):
    body, headers = _delivery()
    headers["X-MLflow-Signature"] = f"v1,bm90IGl0 {headers['X-MLflow-Signature']}"
    with django_capture_on_commit_callbacks(execute=True):
        response = _post(client, body, headers)
    assert response.status_code == 202
    assert len(sent_syncs) == 1


def _wrong_secret() -> tuple[bytes, dict[str, str]]:
    return _delivery(secret="not-the-secret")


def _tampered_body() -> tuple[bytes, dict[str, str]]:
    body, headers = _delivery()
    return body.replace(b'"1"', b'"2"'), headers


def _header_removed(name: str) -> Callable[[], tuple[bytes, dict[str, str]]]:
    def make() -> tuple[bytes, dict[str, str]]:
        body, headers = _delivery()
        del headers[name]
        return body, headers

    return make


def _header_replaced(name: str, value: str) -> Callable[[], tuple[bytes, dict[str, str]]]:
    def make() -> tuple[bytes, dict[str, str]]:
        body, headers = _delivery()
        return body, {**headers, name: value}

    return make


@pytest.mark.django_db
@pytest.mark.parametrize(
    "make",
    [
        _wrong_secret,
        _tampered_body,
        _header_removed("X-MLflow-Signature"),
        _header_removed("X-MLflow-Timestamp"),
        _header_removed("X-MLflow-Delivery-Id"),
        _header_replaced("X-MLflow-Signature", "v1,garbage"),
        _header_replaced("X-MLflow-Signature", "é"),
        _header_replaced("X-MLflow-Delivery-Id", "another-delivery"),  # signature no longer fits
        _header_replaced("X-MLflow-Timestamp", "soon"),
    ],
    ids=[
        "wrong-secret",
        "tampered-body",
        "no-signature",
        "no-timestamp",
        "no-delivery-id",
        "garbage-signature",
        "non-ascii-signature",
        "other-delivery-id",
        "non-numeric-timestamp",
    ],
)
def test_bad_signature_is_401_and_sends_nothing(
    client, webhook_secret, sent_syncs, django_capture_on_commit_callbacks, make
):
    body, headers = make()
    before = _counts()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _post(client, body, headers)
    assert response.status_code == 401
    assert response.json()["detail"]
    assert callbacks == [] and sent_syncs == []
    assert _counts() == before


@pytest.mark.django_db
@pytest.mark.parametrize("age_s", [301, 3600, -301], ids=["just-stale", "an-hour-old", "future"])
def test_timestamp_outside_five_minutes_is_401(
    client, webhook_secret, sent_syncs, django_capture_on_commit_callbacks, age_s
):
    body, headers = _delivery(age_s=age_s)  # correctly signed, but replayed (or from the future)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _post(client, body, headers)
    assert response.status_code == 401
    assert "timestamp" in response.json()["detail"]
    assert callbacks == [] and sent_syncs == []


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe\x00garbage", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"entity": "model_version"}).encode(), "'entity' and 'action'"),
        (json.dumps(_payload("prompt", "created")).encode(), "unknown event type"),
        (json.dumps(_payload("model_version", "deleted")).encode(), "unknown event type"),
        (json.dumps(_payload("budget_policy", "exceeded")).encode(), "unknown event type"),
    ],
    ids=["broken-json", "not-utf8", "array", "no-action", "prompt", "no-such-event", "budget"],
)
def test_signed_but_malformed_or_unknown_is_400(
    client, webhook_secret, sent_syncs, django_capture_on_commit_callbacks, body, message
):
    body, headers = _delivery(body)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _post(client, body, headers)
    assert response.status_code == 400
    assert message in response.json()["detail"]
    assert callbacks == [] and sent_syncs == []


@pytest.mark.django_db
def test_without_a_secret_the_endpoint_is_503(
    client, settings, sent_syncs, django_capture_on_commit_callbacks
):
    settings.MLFLOW_WEBHOOK_SECRET = ""
    body, headers = _delivery(secret="")
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = _post(client, body, headers)
    assert response.status_code == 503
    assert response.json() == {"detail": "webhooks not configured"}
    assert callbacks == [] and sent_syncs == []


@pytest.mark.django_db
def test_only_post_is_allowed(client, webhook_secret):
    assert client.get(URL).status_code == 405


# --- the register_mlflow_webhook command, on an in-process SQL store -------------------------


@pytest.fixture
def sql_store(tmp_path: Path, settings) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.sqlite'}"
    settings.MLFLOW_TRACKING_URI = settings.MLFLOW_REGISTRY_URI = uri
    return uri


def test_register_command_creates_then_updates_one_webhook(
    sql_store, webhook_secret, settings, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    settings.SITE_URL = "http://127.0.0.1:8000/"
    out = io.StringIO()
    call_command("register_mlflow_webhook", stdout=out)
    call_command("register_mlflow_webhook", "--site-url", "http://127.0.0.1:9000", stdout=out)
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "created webhook 'rollgate'",
        "updated webhook 'rollgate'",
    ]
    (webhook,) = MlflowClient(tracking_uri=sql_store, registry_uri=sql_store).list_webhooks()
    assert webhook.url == "http://127.0.0.1:9000/registry/webhooks/mlflow"
    assert sorted(str(e) for e in webhook.events) == sorted(f"{e}.{a}" for e, a in REGISTRY_EVENTS)
    assert str(webhook.status) == "ACTIVE"


def test_register_command_reports_mlflow_refusing_the_url(sql_store, webhook_secret, monkeypatch):
    monkeypatch.delenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", raising=False)  # MLflow: https only
    with pytest.raises(CommandError, match="scheme"):
        call_command("register_mlflow_webhook", "--site-url", "http://127.0.0.1:8000")


def test_register_command_refuses_to_guess_between_namesakes(
    sql_store, webhook_secret, monkeypatch
):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "http,https")
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    client = MlflowClient(tracking_uri=sql_store, registry_uri=sql_store)
    for port in (8001, 8002):
        client.create_webhook("rollgate", f"http://127.0.0.1:{port}/x", ["model_version.created"])
    with pytest.raises(CommandError, match="2 webhooks named 'rollgate'"):
        call_command("register_mlflow_webhook")
    assert sorted(w.url for w in client.list_webhooks()) == [
        "http://127.0.0.1:8001/x",
        "http://127.0.0.1:8002/x",
    ]


def test_register_command_needs_a_secret(sql_store, settings):
    settings.MLFLOW_WEBHOOK_SECRET = ""
    with pytest.raises(CommandError, match="MLFLOW_WEBHOOK_SECRET"):
        call_command("register_mlflow_webhook")


# --- real: an MLflow server delivers to the live portal --------------------------------------

TIME_LIMIT_S = 90
SERVER_START_S = 60
MODEL = "webhook-model"


@pytest.fixture
def time_limit() -> Iterator[None]:
    """Fail the test once its body has run ``TIME_LIMIT_S`` seconds (SIGALRM, main thread).

    Request it last, so that it starts after the MLflow server is up: the start-up has its own
    limit (``SERVER_START_S``) and, on a loaded machine, takes anything from 10 to 50 seconds.
    """

    def expired(signum: int, frame: Any) -> None:
        pytest.fail(f"gave up after {TIME_LIMIT_S}s", pytrace=False)

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TIME_LIMIT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    """A real ``mlflow server`` on loopback (SQLite backend, proxied artifacts, all in
    ``tmp_path``) allowed to deliver webhooks over http to private addresses; yields its URL.

    The server is started in a session of its own (``mlflow server`` runs uvicorn as a child
    process), and that whole process group is stopped at teardown, whatever the outcome.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        # Webhook secrets are stored Fernet-encrypted; without a fixed key each server worker
        # process draws its own and cannot read secrets another worker wrote.
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
        # The server's job runner (huey consumers, for GenAI jobs) is unused here and triples
        # the start-up time.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    log_path = tmp_path / "mlflow-server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mlflow",
                "server",
                "--backend-store-uri",
                f"sqlite:///{tmp_path / 'mlflow.sqlite'}",
                "--artifacts-destination",
                str(tmp_path / "artifacts"),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--workers",
                "1",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:

        def answers() -> bool:
            if proc.poll() is not None:
                pytest.fail("mlflow server exited:\n" + log_path.read_text()[-4000:])
            try:
                return requests.get(f"{url}/health", timeout=5).status_code == 200
            except requests.RequestException:  # not listening yet, or still starting up
                return False

        _wait_for(answers, SERVER_START_S, "mlflow server to answer /health")
        yield url
    finally:
        _stop_group(proc)
        print("--- mlflow server log (tail) ---\n" + log_path.read_text()[-3000:])


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
    try:  # uvicorn may outlive the mlflow CLI that started it
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class _SyncProbe:
    """Counts registry syncs started and finished (they run in the live server's threads), so
    the test can wait for the portal to be idle before the database is flushed."""

    def __init__(self, real: Callable[..., Any]) -> None:
        self.real, self.started, self.finished = real, 0, 0
        self.lock = threading.Lock()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            self.started += 1
        try:
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.finished += 1

    def idle(self) -> bool:
        with self.lock:
            return self.started == self.finished


@pytest.fixture
def mlflow_globals_restored(monkeypatch) -> None:
    """Undo, after the test, what ``mlflow.set_tracking_uri``, ``set_registry_uri`` and
    ``set_experiment`` leave behind (module globals and environment variables, which later
    subprocesses such as the e2e Celery worker inherit): they would point at a stopped server."""
    import mlflow.tracking._model_registry.utils as registry_utils
    import mlflow.tracking._tracking_service.utils as tracking_utils
    import mlflow.tracking.fluent as fluent

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    monkeypatch.setattr(fluent, "_active_experiment_id", fluent._active_experiment_id)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_ID"):
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.delenv(name, raising=False)


@pytest.mark.slow
# serialized_rollback, as in the e2e and browser tests: the flush after a transactional test must
# not lose the rows migrations create (role groups), nor clash with the next test's restore.
@pytest.mark.django_db(transaction=True, serialized_rollback=True)
def test_mlflow_server_delivers_registry_events_to_the_portal(
    mlflow_server, live_server, settings, monkeypatch, mlflow_globals_restored, time_limit
):
    from mlflow import MlflowClient

    from registry.demo_models import train_and_register

    settings.MLFLOW_TRACKING_URI = settings.MLFLOW_REGISTRY_URI = mlflow_server
    settings.MLFLOW_ARTIFACT_ROOT = "mlflow-artifacts:/webhook-test"
    settings.MLFLOW_WEBHOOK_SECRET = SECRET
    settings.SITE_URL = live_server.url
    # The MLflow client retries an unreachable server for minutes by default: fail fast.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    probe = _SyncProbe(services.registry_sync)
    monkeypatch.setattr(services, "registry_sync", probe)

    # The command creates the webhook, and a second run updates it rather than adding one.
    out = io.StringIO()
    call_command("register_mlflow_webhook", stdout=out)
    call_command("register_mlflow_webhook", stdout=out)
    created, updated = out.getvalue().splitlines()
    assert created.startswith("created webhook 'rollgate'")
    assert updated.startswith("updated webhook 'rollgate'")
    client = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
    webhooks = list(client.list_webhooks())
    assert [(w.name, w.url) for w in webhooks] == [("rollgate", f"{live_server.url}{URL}")]

    # A forged delivery over real HTTP: 401, nothing synced, nothing written.
    before = _counts()
    body, headers = _delivery(secret="forged")
    response = requests.post(f"{live_server.url}{URL}", data=body, headers=headers, timeout=10)
    assert response.status_code == 401
    assert probe.started == 0
    assert _counts() == before

    # A data scientist registers a model with the MLflow client; MLflow tells the portal.
    assert train_and_register("logistic", MODEL) == 1
    mirrored = _wait_for(
        lambda: ModelVersion.objects.filter(registered_model__name=MODEL, version=1).first(),
        45,
        f"the webhook-triggered sync to mirror {MODEL} v1",
    )
    assert probe.started >= 1
    assert mirrored.status == "READY"
    assert mirrored.signature is not None and len(mirrored.signature["inputs"]) == 30
    assert set(mirrored.metrics) >= {"accuracy", "roc_auc"}
    assert AuditEvent.objects.filter(action="registry.sync").exists()

    # Let syncs still running in the live server finish before the tables are flushed.
    _wait_for(probe.idle, 30, "the portal's registry syncs to finish")

"""The serving route's HTTP limits against the real production server (gunicorn with the
uvicorn worker of portal/gunicorn_conf.py): an over-limit body gets its 413 even when the
client writes the whole body before reading (Python's urllib does), with a Content-Length or
chunked; oversized request lines and headers are refused before they are processed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings

from registry.demo_models import breast_cancer_split
from rollouts.services import api_key_create
from tests.conftest import ROOT, _test_database_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, serialized_rollback=True)]

LIMIT = 64 * 1024  # the endpoint's own body limit in these tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(synced, deploy, mlflow_store):
    """A live endpoint (body limit ``LIMIT``) with a key, served by a real gunicorn."""
    v1, _ = synced
    req = deploy(v1, "staging")
    req.endpoint.max_body_bytes = LIMIT
    req.endpoint.save(update_fields=["max_body_bytes"])
    _, key = api_key_create(name="http-limits", endpoints=[req.endpoint], created_by=None)
    port = _free_port()
    work = Path(tempfile.mkdtemp(prefix="rollgate-http-"))
    log = open(work / "gunicorn.log", "wb")  # noqa: SIM115 - closed below
    env = {
        **os.environ,
        "DATABASE_URL": _test_database_url(),
        "MLFLOW_TRACKING_URI": mlflow_store["tracking_uri"],
        "MLFLOW_REGISTRY_URI": mlflow_store["tracking_uri"],
        "MLFLOW_ARTIFACT_ROOT": mlflow_store["artifact_root"],
        "SECRET_KEY": settings.SECRET_KEY or "x",
        "PORT": str(port),
        "WEB_CONCURRENCY": "1",
        "GUNICORN_ACCESSLOG": "",
        "PROMETHEUS_MULTIPROC_DIR": str(work / "prometheus"),
        "SERVING_LOG_BUFFERED": "0",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "portal.asgi:application",
            "-c",
            "portal/gunicorn_conf.py",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(
                    "gunicorn did not start:\n" + (work / "gunicorn.log").read_text()[-4000:]
                )
            time.sleep(0.3)
    row = breast_cancer_split().X_test.iloc[[0]]
    body = json.dumps({"dataframe_split": json.loads(row.to_json(orient="split", index=False))})
    yield {
        "base": base,
        "port": port,
        "url": f"{base}/serving/{req.endpoint.name}/invocations",
        "key": key,
        "body": body.encode(),
        "log": work / "gunicorn.log",
    }
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _urllib_post(server, body, *, chunked: bool = False, headers=None):
    """POST the way urllib does: the whole body first (with ``Connection: close``), then read."""
    data = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
    request = urllib.request.Request(
        server["url"],
        data=data,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "Authorization": f"Bearer {server['key']}",
            **({"Transfer-Encoding": "chunked"} if chunked else {}),
            **(headers or {}),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _raw(server, head: bytes) -> bytes:
    """Send ``head`` as the start of a request, then read what the server answers."""
    with socket.create_connection(("127.0.0.1", server["port"]), timeout=30) as sock:
        try:
            sock.sendall(head)
        except OSError:  # the server may answer and close while we still send
            pass
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def _past_the_drain_bound(server) -> bytes:
    """A declared body past SERVING_DRAIN_MAX_BYTES: answered and closed without reading on."""
    path = "/" + server["url"].split("/", 3)[3]
    return _raw(
        server,
        (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Authorization: Bearer {server['key']}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {10**12}\r\n\r\n"
        ).encode(),
    )


def test_over_limit_bodies_get_their_answer_with_urllib(server):
    """One server for every case (a start costs seconds): scored, then 413 with a
    Content-Length and chunked, just over the limit and 4 MiB, then a 401 sent before the
    body was read, then a body past the drain bound."""
    status, body = _urllib_post(server, server["body"])
    assert status == 200, body
    assert len(json.loads(body)["predictions"]) == 1
    for chunked in (False, True):
        for size in (LIMIT + 1, 4 * 1024 * 1024):
            status, body = _urllib_post(server, b"[" + b"1," * (size // 2) + b"1]", chunked=chunked)
            assert status == 413, (chunked, size, body)
            answer = json.loads(body)
            assert answer["error_code"] == "REQUEST_TOO_LARGE"
            assert f"limit of {LIMIT} bytes" in answer["message"]
    status, body = _urllib_post(
        server, b" " * (2 * LIMIT), headers={"Authorization": "Bearer not-a-key"}
    )
    assert status == 401
    assert json.loads(body)["error_code"] == "UNAUTHENTICATED"
    answer = _past_the_drain_bound(server)
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"connection: close" in answer.lower()
    status, _ = _urllib_post(server, server["body"])  # the server is still fine
    assert status == 200


HEADS = {
    "64MB-header": b"X-Big: " + b"a" * (64 * 1024 * 1024) + b"\r\n",
    "one-long-field": b"X-Big: " + b"a" * 20000 + b"\r\n",
    "many-fields": b"".join(b"X-%d: v\r\n" % i for i in range(500)),
    "large-total": b"".join(b"X-%d: %s\r\n" % (i, b"v" * 8000) for i in range(60)),
}


def test_oversized_request_heads_are_refused(server):
    """431 for too many, too long or too much header; 414 for a long request line; ordinary
    headers pass."""
    for name, fields in HEADS.items():
        answer = _raw(server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + fields + b"\r\n")
        assert answer.startswith(b"HTTP/1.1 431 "), (name, answer[:200])
    answer = _raw(
        server, b"GET /health?q=" + b"a" * 20000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 414 "), answer[:200]
    status, _ = _urllib_post(server, server["body"], headers={"X-Trace": "t" * 4000})
    assert status == 200

"""The ASGI fast path (``portal.asgi``, what production serves) gives the same answers, log rows
and errors as the Django view, and hands everything else to Django.

The app's database work (``run_blocking``) is sent back to the test's thread with asgiref's
``sync_to_async``, so it sees the test's transaction (in production it goes to a thread
pool)."""

from __future__ import annotations

import asyncio
import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from portal.asgi import django_application
from rollouts.models import Deployment, PredictionLog, ServingError
from rollouts.serving.asgi import ServingApp
from tests.unit import test_serving_api as view_tests
from tests.unit.test_serving_api import BAD, BODIES, JSON, _assert_rejected, _split

# The Django view's module fixtures: the same deployment, rows and expected predictions.
_fresh_routes = view_tests._fresh_routes
_module_deployment = view_tests._module_deployment
live = view_tests.live
rows = view_tests.rows
expected = view_tests.expected


class Answer:
    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status_code = status
        self.headers = {k.decode().lower(): v.decode() for k, v in headers}
        self.content = body

    def __getitem__(self, name: str) -> str:
        return self.headers[name.lower()]

    def json(self):
        return json.loads(self.content)


async def _in_test_thread(fn, *args):
    return await sync_to_async(fn)(*args)


@pytest.fixture
def call():
    app = ServingApp(django_application, run_blocking=_in_test_thread)

    def call(method: str, path: str, body: bytes = b"", headers=(), chunk: int = 0) -> Answer:
        pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
        messages = [
            {"type": "http.request", "body": p, "more_body": i < len(pieces) - 1}
            for i, p in enumerate(pieces)
        ]
        sent: list[dict] = []

        async def receive():
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        async_to_sync(app)(scope, receive, send)
        start = next(m for m in sent if m["type"] == "http.response.start")
        body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return Answer(start["status"], start["headers"], body_out)

    return call


def _post(call, live, body, content_type=JSON, key=None, **kwargs) -> Answer:
    if isinstance(body, str):
        body = body.encode()
    headers = [("Content-Type", content_type), ("Authorization", f"Bearer {key or live.key}")]
    headers += [(k, v) for k, v in kwargs.pop("headers", [])]
    return call("POST", live.url, body, headers, **kwargs)


@pytest.mark.parametrize("build,content_type", BODIES.values(), ids=BODIES.keys())
def test_each_body_format_scores_and_logs_like_the_django_view(
    call, live, rows, expected, build, content_type
):
    response = _post(call, live, build(rows), content_type, chunk=97)  # body in pieces

    assert response.status_code == 200, response.content
    assert response.json() == {"predictions": expected}
    assert response["X-Model-Version"] == "1"
    logs = list(PredictionLog.objects.order_by("row_index"))
    assert [str(log.request_id) for log in logs] == [response["X-Request-Id"]] * len(rows)
    assert [log.prediction for log in logs] == expected
    assert [log.features for log in logs] == rows.to_dict(orient="records")
    assert all(0.0 <= log.score <= 1.0 for log in logs)
    assert {log.api_key_id for log in logs} == {live.key_id}
    assert {log.deployment_id for log in logs} == {
        Deployment.objects.get(endpoint=live.endpoint, status=Deployment.Status.LIVE).pk
    }


@pytest.mark.parametrize("build,content_type,status,code,fragments", BAD.values(), ids=BAD.keys())
def test_bad_input_gets_the_same_error_as_the_django_view(
    call, live, rows, build, content_type, status, code, fragments
):
    response = _post(call, live, build(rows), content_type)

    _assert_rejected(response, status, code, *fragments)
    assert ServingError.objects.get().status_code == status


def test_keys_endpoints_methods_and_sizes_are_checked(call, live, rows, settings):
    _assert_rejected(_post(call, live, _split(rows), key="wrong"), 401, "UNAUTHENTICATED")
    missing = call("POST", live.url, _split(rows).encode(), [("Content-Type", JSON)])
    _assert_rejected(missing, 401, "UNAUTHENTICATED", "Bearer")
    assert missing["WWW-Authenticate"] == "Bearer"
    unknown = call("POST", "/serving/no-such-endpoint/invocations", b"{}", [("Content-Type", JSON)])
    _assert_rejected(unknown, 404, "RESOURCE_DOES_NOT_EXIST")
    get = call("GET", live.url, headers=[("Authorization", f"Bearer {live.key}")])
    _assert_rejected(get, 405, "METHOD_NOT_ALLOWED")
    assert get["Allow"] == "POST"
    inference = _post(call, live, _split(rows), headers=[("X-Inference-Id", "x" * 129)])
    _assert_rejected(inference, 400, "INVALID_PARAMETER_VALUE", "X-Inference-Id")

    settings.SERVING_MAX_BODY_BYTES = 200
    # No Content-Length and a body in pieces: still cut off at the limit.
    _assert_rejected(
        _post(call, live, _split(rows), chunk=64), 413, "REQUEST_TOO_LARGE", "limit of 200"
    )
    assert ServingError.objects.filter(status_code=413).count() == 1


def test_the_inference_id_is_echoed_and_logged(call, live, rows):
    response = _post(call, live, _split(rows), headers=[("X-Inference-Id", "order-77")])

    assert response.status_code == 200
    assert response["X-Inference-Id"] == "order-77"
    assert set(PredictionLog.objects.values_list("inference_id", flat=True)) == {"order-77"}


def test_everything_else_is_served_by_django(call, db):
    health = call("GET", "/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    login = call("GET", "/login/")
    assert login.status_code == 200
    assert b"<form" in login.content

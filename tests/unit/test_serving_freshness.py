"""Serving never answers from routing or key data older than ``SERVING_ROUTE_TTL_S`` (issue 9,
point 1), on both transports (the Django view, WSGI, and the ASGI fast path production serves).

The serving process's clock is a fake one (``runtime.time``) so a worker can be left idle past
the TTL without waiting; the changes are made as another process would make them (the rollback
service, which does not touch this process's tables, and a revocation written straight to the
database, not through the service that also clears this process's key table)."""

from __future__ import annotations

import json
import threading

import pytest
from django.db import OperationalError
from django.utils import timezone

from registry.demo_models import breast_cancer_split
from rollouts import services
from rollouts.models import ApiKey, Environment
from rollouts.serving import runtime
from rollouts.serving.runtime import EndpointRoutes, Route, Router, model_cache, refresher
from tests.unit.test_serving_asgi import call  # noqa: F401 - the ASGI client fixture

JSON = "application/json"


class FakeClock:
    """Stands in for the ``time`` module inside :mod:`rollouts.serving.runtime`."""

    def __init__(self) -> None:
        self.now = 10_000.0

    def monotonic(self) -> float:
        return self.now

    def idle(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(runtime, "time", fake)
    return fake


@pytest.fixture
def body() -> bytes:
    row = breast_cancer_split().X_test.iloc[[0]]
    split = json.loads(row.to_json(orient="split", index=False))
    return json.dumps({"dataframe_split": split}).encode()


@pytest.fixture(params=["wsgi", "asgi"])
def post(request, client, body):
    """``post(endpoint, key)`` -> (status, X-Model-Version or None, error_code or None)."""
    if request.param == "wsgi":

        def post(endpoint, key):
            response = client.post(
                f"/serving/{endpoint.name}/invocations",
                body,
                content_type=JSON,
                headers={"Authorization": f"Bearer {key}"},
            )
            return _outcome(response.status_code, response.headers, response.content)

    else:
        asgi = request.getfixturevalue("call")

        def post(endpoint, key):
            response = asgi(
                "POST",
                f"/serving/{endpoint.name}/invocations",
                body,
                [("Content-Type", JSON), ("Authorization", f"Bearer {key}")],
            )
            return _outcome(response.status_code, response.headers, response.content)

    return post


def _outcome(status, headers, content):
    lowered = {k.lower(): v for k, v in headers.items()}
    code = json.loads(content).get("error_code") if status != 200 else None
    return status, lowered.get("x-model-version"), code


@pytest.fixture
def staging(synced, deploy):
    """v1 live on staging (v2 scores lower: staging tolerates it), two keys for the endpoint."""
    Environment.objects.filter(name="staging").update(metric_tolerance=0.1)
    v1, v2 = synced
    req = deploy(v1, "staging")
    assert req.status == "live", req.status_reason
    keys = [
        services.api_key_create(name=name, endpoints=[req.endpoint], created_by=None)
        for name in ("revoked-soon", "kept")
    ]
    return req.endpoint, v1, v2, keys


def _revoke_elsewhere(key_row: ApiKey) -> None:
    """A revocation made by another process: this one's key table is not told."""
    ApiKey.objects.filter(pk=key_row.pk).update(revoked_at=timezone.now())


def test_after_an_idle_spell_a_rollback_and_a_revocation_answer_the_very_next_request(
    staging, deploy, post, clock, settings
):
    endpoint, v1, v2, ((revoked_row, revoked), (_, kept)) = staging
    assert deploy(v2, "staging").status == "live"
    clock.idle(settings.SERVING_ROUTE_TTL_S)
    assert post(endpoint, revoked) == (200, "2", None)
    assert post(endpoint, kept) == (200, "2", None)

    clock.idle(settings.SERVING_ROUTE_TTL_S + 30)  # a quiet spell on this worker
    services.deployment_rollback(endpoint_id=endpoint.pk, actor=None, reason="bad canary")
    _revoke_elsewhere(revoked_row)

    assert post(endpoint, kept) == (200, "1", None)  # the stable version, at once
    assert post(endpoint, revoked) == (401, None, "UNAUTHENTICATED")


def test_a_version_that_goes_live_answers_the_first_request_after_the_ttl(
    staging, deploy, post, clock, settings
):
    endpoint, v1, v2, (_, (_, kept)) = staging
    assert post(endpoint, kept) == (200, "1", None)

    assert deploy(v2, "staging").status == "live"
    clock.idle(settings.SERVING_ROUTE_TTL_S)

    assert post(endpoint, kept) == (200, "2", None)


def test_an_entry_past_the_ttl_that_cannot_be_read_again_is_503_not_the_old_answer(
    staging, post, clock, settings, monkeypatch
):
    endpoint, v1, v2, (_, (_, kept)) = staging
    assert post(endpoint, kept) == (200, "1", None)

    def down(*args):
        raise OperationalError("the database is down")

    monkeypatch.setattr(Router, "_load", staticmethod(down))
    clock.idle(settings.SERVING_ROUTE_TTL_S)

    assert post(endpoint, kept) == (503, None, "TEMPORARILY_UNAVAILABLE")


def test_the_refresher_brings_changes_in_before_any_entry_expires(
    staging, deploy, post, clock, settings
):
    endpoint, v1, v2, ((revoked_row, revoked), (_, kept)) = staging
    assert post(endpoint, revoked) == (200, "1", None)
    assert post(endpoint, kept) == (200, "1", None)

    assert deploy(v2, "staging").status == "live"
    _revoke_elsewhere(revoked_row)
    clock.idle(settings.SERVING_ROUTE_TTL_S / 2)
    refresher.run_once()  # what the worker's refresher thread does every half TTL

    assert post(endpoint, kept) == (200, "2", None)
    assert post(endpoint, revoked) == (401, None, "UNAUTHENTICATED")


@pytest.fixture
def no_load_on_the_request_path(monkeypatch):
    """After this is called, loading a model version raises (the request path must find it
    loaded already)."""

    def forbid():
        def load(name, version):
            raise AssertionError(f"{name} v{version} was loaded on the request path")

        monkeypatch.setattr(runtime.mlflow_client, "load_pyfunc", load)

    return forbid


def test_the_first_request_after_a_rollout_is_served_by_a_version_already_loaded(
    staging, deploy, post, clock, settings, monkeypatch, no_load_on_the_request_path
):
    endpoint, v1, v2, (_, (_, kept)) = staging
    assert post(endpoint, kept) == (200, "1", None)
    model_cache.retain({(v1.registered_model.name, 1)})  # v2 not loaded in this process

    smoke_test = services._smoke_test

    def smoke_test_while_the_refresher_runs(model_version):
        refresher.run_once()  # the refresher's cycles during the launch see it launching
        return smoke_test(model_version)

    monkeypatch.setattr(services, "_smoke_test", smoke_test_while_the_refresher_runs)
    assert deploy(v2, "staging").status == "live"
    assert model_cache.peek(v2.registered_model.name, 2) is not None
    no_load_on_the_request_path()
    clock.idle(settings.SERVING_ROUTE_TTL_S)

    assert post(endpoint, kept) == (200, "2", None)


def test_the_rollback_target_stays_loaded_so_a_rollback_needs_no_load(
    staging, deploy, post, clock, settings, no_load_on_the_request_path
):
    endpoint, v1, v2, (_, (_, kept)) = staging
    assert deploy(v2, "staging").status == "live"
    clock.idle(settings.SERVING_ROUTE_TTL_S)
    assert post(endpoint, kept) == (200, "2", None)
    refresher.run_once()
    assert model_cache.peek(v1.registered_model.name, 1) is not None  # kept: rollback target

    model_cache.retain({(v2.registered_model.name, 2)})
    refresher.run_once()
    assert model_cache.peek(v1.registered_model.name, 1) is not None  # and loaded again

    no_load_on_the_request_path()
    services.deployment_rollback(endpoint_id=endpoint.pk, actor=None, reason="bad release")
    clock.idle(settings.SERVING_ROUTE_TTL_S)
    assert post(endpoint, kept) == (200, "1", None)


def _routes(version: int, now: float) -> EndpointRoutes:
    return EndpointRoutes(1, "ep", None, (Route(1, 1, "m", version, 100, None, None),), now)


def test_requests_past_the_ttl_wait_for_the_read_under_way_and_never_use_the_old_entry(
    clock, settings, monkeypatch
):
    """One read per endpoint at a time: a second request that finds the entry expired while
    another thread is reading it waits for that read instead of answering from the old one."""
    table = Router()
    reads: list[int] = []
    reading, release = threading.Event(), threading.Event()

    def load(name, now):
        reads.append(len(reads) + 1)
        if len(reads) == 2:
            reading.set()
            assert release.wait(30)
        return _routes(len(reads), now)

    monkeypatch.setattr(table, "_load", load)
    assert table.get("ep").routes[0].version == 1
    clock.idle(settings.SERVING_ROUTE_TTL_S)

    answers: dict[str, int] = {}

    def request(name):
        answers[name] = table.get("ep").routes[0].version

    first = threading.Thread(target=request, args=("first",))
    first.start()
    assert reading.wait(30)
    second = threading.Thread(target=request, args=("second",))
    second.start()
    second.join(0.3)
    assert "second" not in answers  # waiting for the read, not answering from version 1
    release.set()
    first.join(30)
    second.join(30)

    assert answers == {"first": 2, "second": 2}
    assert reads == [1, 2]  # the waiting request used the read it waited for

"""Generated cases against every REST route and the serving route (issue 9, point 2).

- schemathesis (v4) reads the OpenAPI schema drf-spectacular builds in-process and generates
  positive and negative cases for every operation; each is sent to the WSGI application with a
  platform admin's token and checked with ``not_a_server_error`` and
  ``status_code_conformance`` (every status answered is documented). At least 1,000 cases.
- hypothesis posts generated bodies (records of the model's columns with any JSON values,
  arbitrary JSON, arbitrary bytes under several content types) to
  ``/serving/<endpoint>/invocations`` with a serving key: never a 500.

Each case runs in a savepoint that is rolled back, so the seeded data stays as it was.
"""

from __future__ import annotations

import json

import pytest
from django.conf import settings
from django.core import signals
from django.db import close_old_connections, transaction
from hypothesis import HealthCheck, given, seed
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

#: Examples per operation and generation mode (35 operations, two modes; an operation without
#: inputs has no negative cases): 1,102 cases in all.
EXAMPLES = 19
MIN_CASES = 1000


def _user_token(user) -> str:
    """An ``Authorization`` header value for ``user`` with whichever token scheme the API uses
    (django-rest-knox when it is installed as an authentication class, else DRF tokens)."""
    classes = " ".join(settings.REST_FRAMEWORK.get("DEFAULT_AUTHENTICATION_CLASSES", []))
    if "knox" in classes:
        from knox.models import AuthToken

        return f"Token {AuthToken.objects.create(user)[1]}"
    from rest_framework.authtoken.models import Token

    return f"Token {Token.objects.create(user=user).key}"


@pytest.fixture
def wsgi_app():
    """The project's WSGI application, with the per-request connection closing switched off
    (as Django's test client does), so that requests stay inside the test's transaction."""
    from django.core.wsgi import get_wsgi_application

    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield get_wsgi_application()
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def seeded(synced, deploy, data_scientist, reviewer, platform_admin):
    """A live endpoint (v1 in staging), a request awaiting review (v2), a serving key and a
    platform admin's token: real objects for the generated ids and names to hit."""
    from rollouts import services

    v1, v2 = synced
    live = deploy(v1, "staging")
    endpoint = live.endpoint
    key, raw = services.api_key_create(name="fuzz", endpoints=[endpoint], created_by=platform_admin)
    return {
        "endpoint": endpoint,
        "serving_key": raw,
        "authorization": _user_token(platform_admin),
        "v2": v2,
    }


def _schema_dict() -> dict:
    from drf_spectacular.generators import SchemaGenerator

    return SchemaGenerator().get_schema(request=None, public=True)


def test_generated_cases_against_every_rest_route(seeded, wsgi_app, settings):
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import status_code_conformance

    settings.ALLOWED_HOSTS = ["*"]
    schema = schemathesis.openapi.from_dict(_schema_dict())
    schema.app = wsgi_app
    headers = {"Authorization": seeded["authorization"]}
    counts: dict[str, int] = {}
    failures: list[str] = []

    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30, "every REST route is in the schema"
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @seed(20261203)
            @hsettings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(case=operation.as_strategy(generation_mode=mode))
            def run(case):
                sid = transaction.savepoint()
                try:
                    response = case.call(headers=headers)
                    label = f"{case.method.upper()} {case.path}"
                    counts[label] = counts.get(label, 0) + 1
                    try:
                        case.validate_response(
                            response, checks=[not_a_server_error, status_code_conformance]
                        )
                    except (Exception, BaseExceptionGroup) as exc:  # collect all, report at the end
                        failures.append(f"{label}: {type(exc).__name__}: {str(exc)[:600]}")
                finally:
                    transaction.savepoint_rollback(sid)

            try:
                run()
            except Unsatisfiable:  # no negative case exists (an operation without inputs)
                assert mode == GenerationMode.NEGATIVE, label

    total = sum(counts.values())
    print(f"\nschemathesis: {total} generated cases over {len(counts)} operations")
    assert not failures, "\n".join(sorted(set(failures))[:30])
    assert total >= MIN_CASES, counts


# --- the serving route ------------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


def _bodies(columns: list[str]):
    records = st.lists(
        st.fixed_dictionaries({c: _scalars for c in columns}, optional={"extra": _scalars}),
        min_size=0,
        max_size=3,
    )
    split = st.fixed_dictionaries(
        {
            "columns": st.just(columns),
            "data": st.lists(st.lists(_scalars, max_size=len(columns) + 1)),
        }
    )
    json_body = st.one_of(
        records.map(lambda r: {"dataframe_records": r}),
        split.map(lambda s: {"dataframe_split": s}),
        st.lists(st.lists(_scalars, max_size=3), max_size=3).map(lambda i: {"instances": i}),
        _json,
    ).map(lambda value: json.dumps(value, allow_nan=True).encode())
    raw = st.binary(max_size=200)
    csv = st.lists(st.lists(st.text(max_size=6), max_size=len(columns) + 1), max_size=4).map(
        lambda rows: ("\n".join([",".join(columns)] + [",".join(r) for r in rows])).encode()
    )
    return st.tuples(
        st.one_of(json_body, raw, csv),
        st.sampled_from(["application/json", "text/csv", "application/octet-stream", ""]),
    )


def test_generated_bodies_against_the_serving_route(seeded):
    from django.test import Client

    from rollouts.serving.runtime import router

    client = Client(raise_request_exception=False)  # a server error is a 500 to count

    endpoint = seeded["endpoint"]
    signature = seeded["v2"].signature or {}
    columns = [c["name"] for c in (signature.get("inputs") or []) if c.get("name")][:30]
    url = f"/serving/{endpoint.name}/invocations"
    auth = {"HTTP_AUTHORIZATION": f"Bearer {seeded['serving_key']}"}
    router.invalidate()
    statuses: dict[int, int] = {}
    failures: list[str] = []

    @seed(20261203)
    @hsettings(
        max_examples=300,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(payload=_bodies(columns))
    def run(payload):
        body, content_type = payload
        response = client.generic("POST", url, body, content_type=content_type, **auth)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        if response.status_code >= 500:
            failures.append(f"{response.status_code} for {content_type!r} {body[:300]!r}")

    run()
    print(f"\nserving: {sum(statuses.values())} generated bodies, statuses {statuses}")
    assert statuses.get(200, 0) > 0 or statuses.get(400, 0) > 0
    assert not failures, "\n".join(failures[:20])

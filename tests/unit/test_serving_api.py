"""The scoring API (``/serving/<endpoint>/invocations`` and ``/ping``) against a real deployment
of ``breast-cancer-classifier`` v1 from the session's MLflow store."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import pytest
from django.conf import settings as django_settings
from django.db import transaction
from django.test import RequestFactory, TestCase, override_settings
from django.urls import reverse

from portal import celery_app
from portal.models import Team
from registry.demo_models import breast_cancer_split
from registry.models import ModelVersion
from registry.services import registry_sync
from rollouts import services
from rollouts.models import (
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    PredictionLog,
    ServingError,
)
from rollouts.serving import views
from rollouts.serving.runtime import router
from tests.conftest import REGISTERED_MODEL, TEAM
from tests.factories import UserFactory

N_ROWS = 6
JSON = "application/json"


@dataclass(frozen=True)
class Live:
    endpoint: Endpoint
    key: str
    key_id: int
    url: str


FAST_HASHER = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_routes():
    """The routing table is per process; a route cached by an earlier test (whose rows were
    rolled back) must not answer this one."""
    router.invalidate()
    yield
    router.invalidate()


@pytest.fixture(scope="module")
def rows() -> pd.DataFrame:
    return breast_cancer_split().X_test.head(N_ROWS)


@pytest.fixture(scope="module")
def expected(mlflow_store, rows) -> list[int]:
    """What v1 itself predicts on ``rows``, loaded straight from MLflow."""
    mlflow.set_tracking_uri(django_settings.MLFLOW_TRACKING_URI)
    mlflow.set_registry_uri(django_settings.MLFLOW_REGISTRY_URI)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/1")
    predictions = [int(p) for p in model.predict(rows)]
    assert set(predictions) == {0, 1}, "pick rows of both classes so a mix-up would show"
    return predictions


def _environment(name: str) -> Environment:
    return Environment.objects.get(name=name)


def _deploy(version, data_scientist, reviewer, capture):
    """The real path to staging: request, the gates task and, once approved, the deploy task
    (both eager) on commit."""
    with capture(execute=True):
        req = services.deployment_request_create(
            requester=data_scientist,
            model_version=version,
            environment=_environment("staging"),
            justification="serving API tests",
        )
    req.refresh_from_db()
    assert req.status == "awaiting_review", req.status_reason
    with capture(execute=True):
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    req.refresh_from_db()
    assert req.status == "live", req.status_reason
    router.invalidate()
    return req


def _deploy_v1_with_a_key() -> Live:
    # The team must exist before the sync, which assigns the model to it by its MLflow tag.
    team = Team.objects.get_or_create(slug=TEAM, defaults={"name": "Diagnostics"})[0]
    registry_sync()
    v1 = ModelVersion.objects.get(registered_model__name=REGISTERED_MODEL, version=1)
    # Module-scoped: the per-test fixtures (personas, fast hasher) have not run yet.
    with override_settings(PASSWORD_HASHERS=FAST_HASHER):
        alice = UserFactory(username="alice", roles=["data scientists"])
        bob = UserFactory(username="bob", roles=["reviewers"])
    team.members.add(alice)
    # The autouse fixture that makes tasks eager is per test and has not run yet.
    saved = celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates
    celery_app.conf.task_always_eager = celery_app.conf.task_eager_propagates = True
    try:
        req = _deploy(v1, alice, bob, TestCase.captureOnCommitCallbacks)
    finally:
        celery_app.conf.task_always_eager, celery_app.conf.task_eager_propagates = saved
    key_row, key = services.api_key_create(
        name="scoring-client", endpoints=[req.endpoint], created_by=None
    )
    url = reverse("serving:invocations", kwargs={"endpoint": req.endpoint.name})
    return Live(req.endpoint, key, key_row.pk, url)


@pytest.fixture(scope="module")
def _module_deployment(django_db_setup, django_db_blocker, mlflow_store):
    """One real deployment for the whole module (~1 s each, ~50 tests here), made inside a
    transaction that is rolled back after the module's last test. Each test's own ``db``
    transaction nests in it as a savepoint, so what a test changes is still undone after it."""
    with django_db_blocker.unblock():
        outer = transaction.atomic()
        outer.__enter__()
        try:
            deployed = _deploy_v1_with_a_key()
        except BaseException:
            transaction.set_rollback(True)
            outer.__exit__(None, None, None)
            raise
    yield deployed
    with django_db_blocker.unblock():
        transaction.set_rollback(True)
        outer.__exit__(None, None, None)


@pytest.fixture
def live(db, _module_deployment) -> Live:
    """v1 live on the staging endpoint, and a key scoped to that endpoint."""
    return _module_deployment


def _post(client, live: Live, body: bytes | str, content_type: str = JSON, key: str | None = None):
    if isinstance(body, str):
        body = body.encode()
    headers = {"Authorization": f"Bearer {live.key if key is None else key}"}
    # CONTENT_TYPE explicitly: Django's test client leaves it out when the body is empty.
    return client.post(
        live.url, data=body, content_type=content_type, headers=headers, CONTENT_TYPE=content_type
    )


def _assert_scored(response, live: Live, rows: pd.DataFrame, expected: list[int]) -> None:
    assert response.status_code == 200, response.content
    assert response.json() == {"predictions": expected}
    assert response["X-Model-Name"] == REGISTERED_MODEL
    assert response["X-Model-Version"] == "1"
    request_id = response["X-Request-Id"]
    logs = list(PredictionLog.objects.order_by("row_index"))
    assert len(logs) == len(rows)
    assert {str(log.request_id) for log in logs} == {request_id}
    assert [log.row_index for log in logs] == list(range(len(rows)))
    assert [log.prediction for log in logs] == expected
    assert [log.features for log in logs] == rows.to_dict(orient="records")
    assert {(log.endpoint_id, log.api_key_id, log.model_version.version) for log in logs} == {
        (live.endpoint.pk, live.key_id, 1)
    }
    # Each row names the deployment that answered it (issue 10, point 1).
    answered = Deployment.objects.get(endpoint=live.endpoint, status=Deployment.Status.LIVE)
    assert {log.deployment_id for log in logs} == {answered.pk}


def _assert_rejected(response, status: int, code: str, *fragments: str) -> None:
    assert response.status_code == status, response.content
    body = json.loads(response.content)  # also for responses of views called directly
    assert body["error_code"] == code
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    uuid.UUID(response["X-Request-Id"])
    assert not PredictionLog.objects.exists()


# --- happy path, one test per body format --------------------------------------------------------


def _split(rows: pd.DataFrame) -> str:
    return json.dumps({"dataframe_split": rows.to_dict(orient="split")})


def _shuffled_records(rows: pd.DataFrame) -> str:
    return json.dumps({"dataframe_records": rows[rows.columns[::-1]].to_dict(orient="records")})


BODIES: dict[str, tuple[Callable[[pd.DataFrame], str], str]] = {
    "dataframe_split": (_split, JSON),
    "dataframe_records": (
        lambda r: json.dumps({"dataframe_records": r.to_dict(orient="records")}),
        JSON,
    ),
    "dataframe_records_reordered": (_shuffled_records, JSON),
    "instances_records": (lambda r: json.dumps({"instances": r.to_dict(orient="records")}), JSON),
    "instances_lists": (lambda r: json.dumps({"instances": r.to_numpy().tolist()}), JSON),
    "inputs_records": (lambda r: json.dumps({"inputs": r.to_dict(orient="records")}), JSON),
    "inputs_columns": (lambda r: json.dumps({"inputs": r.to_dict(orient="list")}), JSON),
    "csv": (lambda r: r.to_csv(index=False), "text/csv"),
    "csv_leading_index": (lambda r: r.to_csv(), "text/csv"),
    "csv_utf8_charset": (lambda r: r.to_csv(index=False), "text/csv; charset=utf-8"),
}


@pytest.mark.parametrize("build,content_type", BODIES.values(), ids=BODIES.keys())
def test_each_body_format_scores_like_the_model(client, live, rows, expected, build, content_type):
    response = _post(client, live, build(rows), content_type)
    _assert_scored(response, live, rows, expected)


def test_csv_and_json_give_the_same_predictions_and_log(client, live, rows, expected):
    as_json = _post(client, live, _split(rows))
    as_csv = _post(client, live, rows.to_csv(index=False), "text/csv")

    assert as_json.status_code == as_csv.status_code == 200
    assert as_json.json() == as_csv.json() == {"predictions": expected}
    by_request = {
        rid: [
            log.features
            for log in PredictionLog.objects.filter(request_id=rid).order_by("row_index")
        ]
        for rid in (as_json["X-Request-Id"], as_csv["X-Request-Id"])
    }
    assert as_json["X-Request-Id"] != as_csv["X-Request-Id"]
    assert by_request[as_json["X-Request-Id"]] == by_request[as_csv["X-Request-Id"]]
    assert len(by_request[as_csv["X-Request-Id"]]) == N_ROWS


def test_a_model_that_accepts_infinity_still_gets_logged(client, live, rows, monkeypatch):
    """Infinity is valid for a double column but is not JSON; the log must still take the row
    (SQLite checks JSON_VALID on JSONField columns) rather than answer 500."""

    class AcceptsAnything:
        def predict(self, frame, params=None):
            assert np.isinf(frame["mean area"].iloc[0])
            return np.zeros(len(frame), dtype=np.int64)

    monkeypatch.setattr(views.model_cache, "get", lambda name, version: AcceptsAnything())
    records = rows.head(1).to_dict(orient="records")
    records[0]["mean area"] = float("inf")

    response = _post(client, live, json.dumps({"dataframe_records": records}))

    assert response.status_code == 200, response.content
    assert response.json() == {"predictions": [0]}
    log = PredictionLog.objects.get()
    assert log.features["mean area"] is None
    assert log.features["mean radius"] == records[0]["mean radius"]


# --- bad input: 400 / 415, nothing logged ------------------------------------------------------


def _records(rows: pd.DataFrame) -> list[dict]:
    return rows.to_dict(orient="records")


def _with_cell(rows: pd.DataFrame, column: str, value: object) -> str:
    records = _records(rows)
    records[0][column] = value
    return json.dumps({"dataframe_records": records})


def _short_row(rows: pd.DataFrame) -> str:
    split = rows.to_dict(orient="split")
    split["data"][1] = split["data"][1][:-1]
    return json.dumps({"dataframe_split": split})


def _csv_with_text_cell(rows: pd.DataFrame) -> str:
    frame = rows.astype(object)
    frame.iloc[2, frame.columns.get_loc("mean area")] = "n/a"
    return frame.to_csv(index=False)


BAD: dict[str, tuple[Callable[[pd.DataFrame], str | bytes], str, int, str, tuple[str, ...]]] = {
    "malformed_json": (
        lambda r: _split(r)[:-5],
        JSON,
        400,
        "BAD_REQUEST",
        ("not valid JSON",),
    ),
    "json_list": (
        lambda r: json.dumps(_records(r)),
        JSON,
        400,
        "BAD_REQUEST",
        ("must be a JSON object", "got a JSON list"),
    ),
    "two_format_keys": (
        lambda r: json.dumps({"dataframe_records": _records(r), "instances": _records(r)}),
        JSON,
        400,
        "BAD_REQUEST",
        ("exactly one of", "got dataframe_records, instances"),
    ),
    "zero_format_keys": (
        lambda r: json.dumps({"rows": _records(r)}),
        JSON,
        400,
        "BAD_REQUEST",
        ("exactly one of", "got none"),
    ),
    "bare_columns_data": (
        lambda r: json.dumps({"columns": list(r.columns), "data": r.to_numpy().tolist()}),
        JSON,
        400,
        "BAD_REQUEST",
        ("bare {columns, data}", '{"dataframe_split"'),
    ),
    "missing_column": (
        lambda r: json.dumps({"dataframe_records": _records(r.drop(columns=["worst area"]))}),
        JSON,
        400,
        "BAD_REQUEST",
        ("Missing required column(s) 'worst area'",),
    ),
    "extra_column": (
        lambda r: json.dumps({"dataframe_records": _records(r.assign(patient_id=1))}),
        JSON,
        400,
        "BAD_REQUEST",
        ("Unknown column(s) 'patient_id'",),
    ),
    "string_in_numeric_column": (
        lambda r: _with_cell(r, "mean area", "large"),
        JSON,
        400,
        "BAD_REQUEST",
        ("column 'mean area' (row 0)", "expected a number, got a string"),
    ),
    "boolean_in_numeric_column": (
        lambda r: _with_cell(r, "mean area", True),
        JSON,
        400,
        "BAD_REQUEST",
        ("column 'mean area' (row 0)", "expected a number, got a boolean"),
    ),
    "empty_body": (lambda r: b"", JSON, 400, "BAD_REQUEST", ("The body is empty",)),
    "empty_csv_body": (lambda r: b"", "text/csv", 400, "BAD_REQUEST", ("CSV body is empty",)),
    "empty_data_list": (
        lambda r: json.dumps({"dataframe_split": {"columns": list(r.columns), "data": []}}),
        JSON,
        400,
        "BAD_REQUEST",
        ("no rows",),
    ),
    "row_length_mismatch": (
        _short_row,
        JSON,
        400,
        "BAD_REQUEST",
        ("dataframe_split.data[1] has 29 values but there are 30 columns",),
    ),
    "non_utf8": (
        lambda r: b'{"inputs": "caf\xe9"}',
        JSON,
        400,
        "BAD_REQUEST",
        ("not valid UTF-8",),
    ),
    "unknown_params": (
        lambda r: json.dumps(
            {"dataframe_split": r.to_dict(orient="split"), "params": {"cutoff": 1}}
        ),
        JSON,
        400,
        "BAD_REQUEST",
        ("Unknown param(s) cutoff", "accepts: none"),
    ),
    "csv_non_numeric_cell": (
        _csv_with_text_cell,
        "text/csv",
        400,
        "BAD_REQUEST",
        ("column 'mean area' (row 2)", "expected a number"),
    ),
    "unknown_content_type": (
        lambda r: _split(r),
        "text/plain",
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        ("'text/plain' is not supported",),
    ),
    "charset_latin1": (
        lambda r: _split(r),
        "application/json; charset=latin-1",
        415,
        "UNSUPPORTED_MEDIA_TYPE",
        ("charset 'latin-1' is not supported", "UTF-8"),
    ),
}


@pytest.mark.parametrize("build,content_type,status,code,fragments", BAD.values(), ids=BAD.keys())
def test_bad_input_is_rejected_and_not_logged(
    client, live, rows, build, content_type, status, code, fragments
):
    response = _post(client, live, build(rows), content_type)

    _assert_rejected(response, status, code, *fragments)
    assert response["X-Model-Version"] == "1"


def test_every_error_answer_on_a_known_endpoint_is_counted_for_error_rates(client, live, rows):
    _post(client, live, _with_cell(rows, "mean area", "wide"))  # routed: a version is known
    _post(client, live, _split(rows), key="wrong")  # not routed yet: endpoint only
    client.post("/serving/no-such-endpoint/invocations", data=_split(rows), content_type=JSON)

    errors = ServingError.objects.order_by("status_code")
    assert [(e.status_code, e.model_version_id is not None) for e in errors] == [
        (400, True),
        (401, False),
    ]
    answered = Deployment.objects.get(endpoint=live.endpoint, status=Deployment.Status.LIVE)
    assert [e.deployment_id for e in errors] == [answered.pk, None]
    assert {e.endpoint_id for e in errors} == {live.endpoint.pk}
    assert errors[0].error_code == "BAD_REQUEST"


def test_binary_classifier_rows_are_logged_with_their_positive_class_score(
    client, live, rows, expected
):
    response = _post(client, live, _split(rows))

    assert response.status_code == 200
    scores = list(PredictionLog.objects.order_by("row_index").values_list("score", flat=True))
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert [int(s > 0.5) for s in scores] == expected  # logistic regression: proba > .5 is 1


def test_the_clients_inference_id_is_logged_and_echoed(client, live, rows):
    response = client.post(
        live.url,
        data=_split(rows),
        content_type=JSON,
        headers={"Authorization": f"Bearer {live.key}", "X-Inference-Id": "order-77"},
    )

    assert response.status_code == 200
    assert response["X-Inference-Id"] == "order-77"
    assert set(PredictionLog.objects.values_list("inference_id", flat=True)) == {"order-77"}


def test_an_overlong_inference_id_is_400_naming_the_header(client, live, rows):
    response = client.post(
        live.url,
        data=_split(rows),
        content_type=JSON,
        headers={"Authorization": f"Bearer {live.key}", "X-Inference-Id": "x" * 129},
    )

    _assert_rejected(response, 400, "INVALID_PARAMETER_VALUE", "X-Inference-Id", "128")


def test_model_error_is_422_and_not_logged(client, live, rows, caplog):
    """A null double passes the signature (it is NaN) but logistic regression refuses NaN.
    The model's own message goes to the server log under the request id, not to the client."""
    response = _post(client, live, _with_cell(rows, "mean area", None))

    request_id = response["X-Request-Id"]
    _assert_rejected(response, 422, "MODEL_ERROR", "could not score this input", request_id)
    assert "NaN" not in response.json()["message"]
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and "contains NaN" in str(logged[0].exc_info[1])


# --- body size ---------------------------------------------------------------------------------


def test_body_over_the_limit_is_413_stating_the_limit(client, live, rows, settings):
    settings.SERVING_MAX_BODY_BYTES = 200
    response = _post(client, live, _split(rows))
    _assert_rejected(response, 413, "REQUEST_TOO_LARGE", "limit of 200 bytes")


def test_body_exactly_at_the_limit_is_scored(client, live, rows, expected, settings):
    body = _split(rows).encode()
    settings.SERVING_MAX_BODY_BYTES = len(body)
    _assert_scored(_post(client, live, body), live, rows, expected)

    PredictionLog.objects.all().delete()
    settings.SERVING_MAX_BODY_BYTES = len(body) - 1
    _assert_rejected(
        _post(client, live, body), 413, "REQUEST_TOO_LARGE", f"limit of {len(body) - 1} bytes"
    )


def test_body_over_the_limit_without_content_length_is_413(live, rows, settings):
    """A client that sends no (or a false) Content-Length is still cut off at the limit."""
    settings.SERVING_MAX_BODY_BYTES = 200
    request = RequestFactory().post(
        live.url,
        data=_split(rows),
        content_type=JSON,
        headers={"Authorization": f"Bearer {live.key}"},
    )
    request.META["CONTENT_LENGTH"] = "10"

    response = views.invocations(request, endpoint=live.endpoint.name)

    _assert_rejected(response, 413, "REQUEST_TOO_LARGE", "limit of 200 bytes")


# --- routing and authentication ------------------------------------------------------------------


def test_unknown_endpoint_is_404(client, live, rows):
    url = reverse("serving:invocations", kwargs={"endpoint": "no-such-endpoint"})
    response = client.post(
        url, data=_split(rows), content_type=JSON, headers={"Authorization": f"Bearer {live.key}"}
    )
    _assert_rejected(
        response, 404, "RESOURCE_DOES_NOT_EXIST", "No endpoint named 'no-such-endpoint'"
    )


def test_missing_key_is_401(client, live, rows):
    response = client.post(live.url, data=_split(rows), content_type=JSON)
    _assert_rejected(response, 401, "UNAUTHENTICATED", "Authorization: Bearer <key>")
    assert response["WWW-Authenticate"] == "Bearer"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwdw==", "Bearer ", "Token rg_abc"])
def test_malformed_authorization_header_is_401(client, live, rows, header):
    response = client.post(
        live.url, data=_split(rows), content_type=JSON, headers={"Authorization": header}
    )
    _assert_rejected(response, 401, "UNAUTHENTICATED", "Authorization: Bearer <key>")


def test_wrong_key_is_401(client, live, rows):
    response = _post(client, live, _split(rows), key=live.key + "x")
    _assert_rejected(response, 401, "UNAUTHENTICATED", "not valid or has been revoked")
    assert response["WWW-Authenticate"] == "Bearer"


def test_revoked_key_is_401(client, live, rows, expected):
    _assert_scored(_post(client, live, _split(rows)), live, rows, expected)
    PredictionLog.objects.all().delete()

    services.api_key_revoke(key_id=live.key_id, actor=None)
    response = _post(client, live, _split(rows))

    _assert_rejected(response, 401, "UNAUTHENTICATED", "not valid or has been revoked")


def test_key_scoped_to_another_endpoint_is_403(client, live, rows, synced):
    """A valid key outside its scope is authenticated but not allowed: 403, not 401."""
    v1, _ = synced
    production = services.endpoint_for(model_version=v1, environment=_environment("production"))
    _, other_key = services.api_key_create(
        name="prod-client", endpoints=[production], created_by=None
    )

    response = _post(client, live, _split(rows), key=other_key)

    _assert_rejected(response, 403, "PERMISSION_DENIED", "not allowed to call this endpoint")


def test_endpoint_without_live_version_is_503(client, synced, rows):
    v1, _ = synced
    endpoint = services.endpoint_for(model_version=v1, environment=_environment("production"))
    _, key = services.api_key_create(name="early-client", endpoints=[endpoint], created_by=None)
    url = reverse("serving:invocations", kwargs={"endpoint": endpoint.name})

    response = client.post(
        url, data=_split(rows), content_type=JSON, headers={"Authorization": f"Bearer {key}"}
    )

    _assert_rejected(
        response, 503, "ENDPOINT_NOT_READY", f"Endpoint {endpoint.name!r} has no live version"
    )


def test_get_on_invocations_is_405(client, live):
    response = client.get(live.url, headers={"Authorization": f"Bearer {live.key}"})
    _assert_rejected(response, 405, "METHOD_NOT_ALLOWED", "Use POST")
    assert response["Allow"] == "POST"


# --- ping --------------------------------------------------------------------------------------


def test_ping_unknown_endpoint_is_404(client, db):
    response = client.get(reverse("serving:ping", kwargs={"endpoint": "no-such-endpoint"}))
    assert response.status_code == 404
    assert "No endpoint named 'no-such-endpoint'" in response.json()["message"]


def test_ping_is_503_until_a_version_is_live_then_200(client, live, synced, deploy):
    """``live`` is the module's deployment of v1 to staging (production takes only versions
    that have been live in staging); live in staging is not live in production."""
    v1, _ = synced
    endpoint = services.endpoint_for(model_version=v1, environment=_environment("production"))
    url = reverse("serving:ping", kwargs={"endpoint": endpoint.name})
    assert Deployment.objects.filter(
        model_version=v1, endpoint=live.endpoint, status="live"
    ).exists()

    before = client.get(url)
    assert before.status_code == 503
    assert before.json()["message"] == "no live version"

    assert deploy(v1, "production").status == "live"  # two approvals
    router.invalidate()
    after = client.get(url)

    assert after.status_code == 200
    # Without a key, up or down only: no model names or versions.
    assert after.json() == {"status": "ok"}
    _, key = services.api_key_create(name="prod-client", endpoints=[endpoint], created_by=None)
    keyed = client.get(url, headers={"Authorization": f"Bearer {key}"})
    assert keyed.json() == {
        "status": "ok",
        "versions": [{"model": REGISTERED_MODEL, "version": 1, "weight": 100}],
    }
    # A key of another endpoint, or a wrong one, sees no more than no key.
    staging = services.endpoint_for(model_version=v1, environment=_environment("staging"))
    _, other = services.api_key_create(name="stg-client", endpoints=[staging], created_by=None)
    for header in (f"Bearer {other}", "Bearer rg_wrong"):
        assert client.get(url, headers={"Authorization": header}).json() == {"status": "ok"}


def test_stable_and_canary_rows_name_their_own_deployment(client, live, rows, data_scientist):
    """With v1 stable and v2 a canary at 50 % each, every logged row names the deployment that
    answered it, so canary and stable figures are never mixed."""
    stable = Deployment.objects.get(endpoint=live.endpoint, status=Deployment.Status.LIVE)
    v2 = ModelVersion.objects.get(registered_model__name=REGISTERED_MODEL, version=2)
    req = DeploymentRequest.objects.create(
        model_version=v2,
        endpoint=live.endpoint,
        justification="canary",
        requester=data_scientist,
        status=DeploymentRequest.Status.DEPLOYING,
    )
    canary = Deployment.objects.create(
        endpoint=live.endpoint,
        model_version=v2,
        request=req,
        status=Deployment.Status.LIVE,
        role=Deployment.Role.CANARY,
    )
    services.traffic_set(
        endpoint=live.endpoint, split={stable.pk: 50, canary.pk: 50}, actor=None, reason="test"
    )
    router.invalidate()
    body = json.dumps({"dataframe_records": rows.head(2).to_dict(orient="records")})
    answered = {_post(client, live, body)["X-Model-Version"] for _ in range(30)}
    assert answered == {"1", "2"}  # both served (each request: 1 in 2)
    logged = set(PredictionLog.objects.values_list("model_version__version", "deployment_id"))
    assert logged == {(1, stable.pk), (2, canary.pk)}

"""The main job end to end, over real HTTP, with a real MLflow store and a real Celery worker:
register (MLflow client) -> sync -> request -> gates (worker) -> approve by a second person ->
deploy (worker) -> invoke on held-out rows -> post labels -> the portal's accuracy equals
scikit-learn's."""

from __future__ import annotations

import json
import time

import mlflow
import pytest
import requests
from django.conf import settings
from sklearn.metrics import accuracy_score

from monitoring.rollups import rollups_refresh
from portal.tokens import api_token_create
from registry.demo_models import breast_cancer_split
from registry.models import ModelVersion
from rollouts.models import Deployment, DeploymentRequest, Environment, GateResult, PredictionLog
from rollouts.services import api_key_create
from tests.conftest import REGISTERED_MODEL
from tests.factories import PASSWORD

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def _api(live_server, user) -> requests.Session:
    session = requests.Session()
    session.headers["Authorization"] = f"Token {api_token_create(user=user, actor=None)[1]}"
    session.base = live_server.url
    return session


def _login(live_server, user) -> requests.Session:
    """A browser-like session: log in through the form, keep the CSRF cookie."""
    session = requests.Session()
    session.get(f"{live_server.url}/login/")
    response = session.post(
        f"{live_server.url}/login/",
        data={
            "username": user.username,
            "password": PASSWORD,
            "csrfmiddlewaretoken": session.cookies["csrftoken"],
        },
        headers={"Referer": f"{live_server.url}/login/"},
    )
    assert response.status_code == 200 and "Log out" in response.text
    return session


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def test_register_request_approve_deploy_invoke_feedback(
    live_server, real_worker, data_scientist, reviewer
):
    # 1. The registry is mirrored by the worker after "Sync now".
    browser = _login(live_server, data_scientist)
    response = browser.post(
        f"{live_server.url}/registry/sync",
        data={"csrfmiddlewaretoken": browser.cookies["csrftoken"]},
        headers={"Referer": f"{live_server.url}/registry/"},
    )
    assert response.status_code == 200
    _wait_for(
        lambda: ModelVersion.objects.filter(registered_model__name=REGISTERED_MODEL).count() == 2,
        60,
        "the worker to mirror both versions",
    )
    page = browser.get(f"{live_server.url}/registry/{REGISTERED_MODEL}/versions/1/")
    assert page.status_code == 200 and "mean radius" in page.text

    # 2. The data scientist requests; they cannot approve their own request.
    ds_api, reviewer_api = _api(live_server, data_scientist), _api(live_server, reviewer)
    created = ds_api.post(
        f"{live_server.url}/api/requests",
        json={
            "model": REGISTERED_MODEL,
            "version": 1,
            "environment": "staging",
            "justification": "baseline",
        },
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "pending_gates"
    request_id = created.json()["id"]
    own = ds_api.post(f"{live_server.url}/api/requests/{request_id}/approve", json={})
    assert own.status_code == 403

    # 3. The worker runs the automated gates; the request then awaits review.
    gated = _wait_for(
        lambda: (
            (s := ds_api.get(f"{live_server.url}/api/requests/{request_id}").json())["status"]
            != "pending_gates"
            and s
        ),
        120,
        "the worker to run the gates",
    )
    assert gated["status"] == "awaiting_review", gated
    gates = GateResult.objects.filter(request_id=request_id)
    assert gates.count() == len(Environment.objects.get(name="staging").gates)
    assert all(g.passed for g in gates)

    # 4. A second person approves; the real worker deploys.
    approved = reviewer_api.post(
        f"{live_server.url}/api/requests/{request_id}/approve", json={"comment": "ok"}
    )
    assert approved.status_code == 200, approved.text
    final = _wait_for(
        lambda: (
            (s := ds_api.get(f"{live_server.url}/api/requests/{request_id}").json())["status"]
            not in ("approved", "deploying")
            and s
        ),
        120,
        "the deployment to finish",
    )
    assert final["status"] == "live", final
    endpoint = final["endpoint"]
    deployment = Deployment.objects.get(request_id=request_id)
    assert deployment.status == "live" and deployment.traffic_weight == 100
    assert len(deployment.artifact_digest) == 64
    assert {g.artifact_digest for g in gates} == {deployment.artifact_digest}  # what was gated
    # The worker moves the MLflow alias just after the request goes live (and an earlier test
    # of the session may have left it on another version): wait for it to follow.
    client = mlflow.MlflowClient(settings.MLFLOW_TRACKING_URI)

    def staging_alias() -> int | None:
        try:
            return int(client.get_model_version_by_alias(REGISTERED_MODEL, "staging").version)
        except mlflow.exceptions.MlflowException:
            return None

    _wait_for(lambda: staging_alias() == 1, 60, "the staging alias to follow the live version")

    # 5. Invoke on held-out rows over HTTP; predictions equal the model's own.
    _, key = api_key_create(name="e2e client", endpoints=[deployment.endpoint], created_by=None)
    split = breast_cancer_split()
    X, y = split.X_test.iloc[:60], split.y_test.iloc[:60]
    scoring = requests.Session()
    scoring.headers["Authorization"] = f"Bearer {key}"
    url = f"{live_server.url}/serving/{endpoint}/invocations"
    assert scoring.get(f"{live_server.url}/serving/{endpoint}/ping").status_code == 200
    predictions, feedback = [], []
    for i in range(len(X)):
        body = {"dataframe_split": json.loads(X.iloc[[i]].to_json(orient="split", index=False))}
        response = scoring.post(url, json=body)
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == "1"
        predictions.append(response.json()["predictions"][0])
        feedback.append({"request_id": response.headers["X-Request-Id"], "label": int(y.iloc[i])})
    mlflow.set_tracking_uri(settings.MLFLOW_TRACKING_URI)
    model = mlflow.pyfunc.load_model(f"models:/{REGISTERED_MODEL}/1")
    assert predictions == [int(p) for p in model.predict(X)]
    assert PredictionLog.objects.filter(endpoint__name=endpoint).count() == len(X)

    # 6. Labels arrive; unknown ids are reported back, not dropped silently.
    unknown = "00000000-0000-4000-8000-000000000000"
    posted = scoring.post(
        f"{live_server.url}/api/feedback", json=[*feedback, {"request_id": unknown, "label": 1}]
    )
    assert posted.status_code == 200, posted.text
    assert posted.json() == {"accepted": len(X), "pending": 1, "unknown": [unknown]}  # kept a while (issue 9.12)

    # 7. The accuracy the portal shows equals scikit-learn's on the same rows, once the rollups
    # are refreshed (Celery beat's monitoring.refresh_rollups, run here in-process).
    rollups_refresh(with_drift=False)
    expected = accuracy_score(y, predictions)
    metrics = ds_api.get(f"{live_server.url}/api/endpoints/{endpoint}/metrics").json()
    assert metrics[0]["version"] == 1 and metrics[0]["labeled"] == len(X)
    assert metrics[0]["accuracy"] == expected
    dashboard = browser.get(f"{live_server.url}/monitoring/endpoints/{endpoint}/")
    assert f'data-accuracy="{expected}"' in dashboard.text
    assert DeploymentRequest.objects.get(pk=request_id).status == "live"

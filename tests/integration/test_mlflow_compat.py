"""Compatibility with MLflow's own scoring server: the same bodies go to a real
`mlflow models serve` subprocess on loopback and to Rollgate; status classes and predictions
must agree. Where Rollgate is deliberately stricter (unknown columns), the difference is
asserted explicitly rather than hidden."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from registry.demo_models import breast_cancer_split
from rollouts.services import api_key_create
from tests.conftest import REGISTERED_MODEL

pytestmark = [pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(mlflow_store):
    port = _free_port()
    # mlflow runs `uvicorn` by name: the venv's bin folder must be on PATH.
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_store["tracking_uri"],
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
    }
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{REGISTERED_MODEL}/1",
            "--env-manager",
            "local",
            "-w",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow models serve exited with {proc.returncode}")
            try:
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow models serve did not answer /ping within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def rollgate(client, synced, deploy):
    v1, _ = synced
    req = deploy(v1, "staging")
    _, key = api_key_create(name="compat", endpoints=[req.endpoint], created_by=None)

    def post(body: bytes, content_type: str):
        return client.post(
            f"/serving/{req.endpoint.name}/invocations",
            body,
            content_type=content_type,
            headers={"Authorization": f"Bearer {key}"},
        )

    return post


def _rows(n: int = 4):
    X = breast_cancer_split().X_test
    return X.iloc[[0, 1, 2, 5][:n]]


def _bodies():
    X = _rows()
    split = json.loads(X.to_json(orient="split", index=False))
    records = json.loads(X.to_json(orient="records"))
    return {
        "dataframe_split": (json.dumps({"dataframe_split": split}), "application/json"),
        "dataframe_split_with_index": (
            json.dumps({"dataframe_split": json.loads(X.to_json(orient="split"))}),
            "application/json",
        ),
        "dataframe_records": (json.dumps({"dataframe_records": records}), "application/json"),
        "instances_records": (json.dumps({"instances": records}), "application/json"),
        "inputs_records": (json.dumps({"inputs": records}), "application/json"),
        "inputs_columns": (
            json.dumps({"inputs": {c: X[c].tolist() for c in X.columns}}),
            "application/json",
        ),
        "csv": (X.to_csv(index=False), "text/csv"),
        "csv_with_index": (X.to_csv(), "text/csv"),
        "json_charset": (json.dumps({"dataframe_split": split}), "application/json; charset=utf-8"),
    }


BAD_BODIES = {
    "malformed_json": ('{"dataframe_split": ', "application/json"),
    "two_format_keys": (
        json.dumps({"dataframe_split": {"columns": [], "data": []}, "instances": []}),
        "application/json",
    ),
    "bare_columns_data": (
        json.dumps({"columns": ["mean radius"], "data": [[1.0]]}),
        "application/json",
    ),
    "no_format_key": (json.dumps({"params": {}}), "application/json"),
    "json_list": ("[1, 2]", "application/json"),
    "string_in_float_column": None,  # built below from a real row
    "missing_column": None,
}


def _bad_bodies():
    X = _rows(1)
    bodies = dict(BAD_BODIES)
    records = json.loads(X.to_json(orient="records"))
    wrong = [{**records[0], "mean radius": "big"}]
    bodies["string_in_float_column"] = (
        json.dumps({"dataframe_records": wrong}),
        "application/json",
    )
    missing = [{k: v for k, v in records[0].items() if k != "mean radius"}]
    bodies["missing_column"] = (json.dumps({"dataframe_records": missing}), "application/json")
    return bodies


@pytest.mark.django_db
def test_accepted_bodies_give_the_same_predictions_as_mlflow(mlflow_server, rollgate):
    for name, (body, content_type) in _bodies().items():
        theirs = requests.post(
            f"{mlflow_server}/invocations",
            data=body.encode(),
            headers={"Content-Type": content_type},
            timeout=30,
        )
        ours = rollgate(body.encode(), content_type)
        assert theirs.status_code == 200, (name, theirs.text[:300])
        assert ours.status_code == 200, (name, ours.content[:300])
        assert ours.json() == theirs.json(), name  # same shape: {"predictions": [...]}


@pytest.mark.django_db
def test_rejected_bodies_are_client_errors_in_both(mlflow_server, rollgate):
    for name, (body, content_type) in _bad_bodies().items():
        theirs = requests.post(
            f"{mlflow_server}/invocations",
            data=body.encode(),
            headers={"Content-Type": content_type},
            timeout=30,
        )
        ours = rollgate(body.encode(), content_type)
        assert 400 <= theirs.status_code < 500, (name, theirs.status_code, theirs.text[:300])
        assert ours.status_code == 400, (name, ours.status_code, ours.content[:300])


@pytest.mark.django_db
def test_unknown_content_type_is_415_in_both(mlflow_server, rollgate):
    theirs = requests.post(
        f"{mlflow_server}/invocations",
        data=b"x",
        headers={"Content-Type": "text/plain"},
        timeout=30,
    )
    assert theirs.status_code == 415
    assert rollgate(b"x", "text/plain").status_code == 415


@pytest.mark.django_db
def test_extra_column_is_ignored_by_mlflow_and_refused_by_rollgate(mlflow_server, rollgate):
    """Deliberately stricter: a client sending a column the model does not know has a bug
    (a renamed feature, a stale schema) that MLflow would hide."""
    records = json.loads(_rows(1).to_json(orient="records"))
    body = json.dumps({"dataframe_records": [{**records[0], "unknown feature": 1.0}]})
    theirs = requests.post(
        f"{mlflow_server}/invocations",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
        timeout=30,
    )
    ours = rollgate(body.encode(), "application/json")
    assert theirs.status_code in (200, 400)
    assert ours.status_code == 400 and "unknown feature" in ours.json()["message"]


def test_ping_health_version_exist(client):
    assert client.get("/health").status_code == 200
    assert client.get("/ping").status_code == 200
    assert client.get("/version").status_code == 200

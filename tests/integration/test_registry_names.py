"""The registry mirror against a real MLflow store (SQLite tracking URI, local artifacts) of its
own: any name MLflow allows syncs, one bad model never stops the others, and a version deleted
in MLflow is marked deleted, cannot be requested, and is flagged where it still serves."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.urls import reverse
from django.utils import timezone

from portal.models import AuditEvent
from registry import mlflow_client
from registry.models import ModelVersion, RegisteredModel
from registry.services import registry_sync
from rollouts import services as rollout_services
from rollouts.models import Deployment, DeploymentRequest, Endpoint, Environment
from tests.conftest import TEAM

pytestmark = pytest.mark.slow  # a store of its own: about a minute to build

#: Names MLflow accepts (it refuses only ``/`` and ``:``) that broke the sync: a quote ends the
#: filter string, ``@`` reads as an alias in a ``models:/`` URI; and the other characters that
#: mean something in a filter, a URI or a URL.
NAMES = ["o'neil-model", "demo@prod", 'say "hi" %20 #1 ?x=1', "naïve model", "plain-model"]


def _register(client, name: str):
    """Register a new version of ``name``: a minimal pyfunc model, quick to log."""
    import mlflow
    import mlflow.pyfunc
    import pandas as pd

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return [0] * len(model_input)

    with mlflow.start_run():
        mlflow.pyfunc.log_model(
            name="model",
            python_model=Echo(),
            registered_model_name=name,
            input_example=pd.DataFrame({"x": [1.0]}),
        )
    client.set_registered_model_tag(name, "team", TEAM)


@pytest.fixture(scope="module")
def store(tmp_path_factory, django_db_blocker):
    import mlflow

    root = tmp_path_factory.mktemp("mlflow-names")
    uri = f"sqlite:///{root / 'mlflow.sqlite'}"
    override = override_settings(
        MLFLOW_TRACKING_URI=uri,
        MLFLOW_REGISTRY_URI=uri,
        MLFLOW_ARTIFACT_ROOT=(root / "artifacts").as_uri(),
    )
    override.enable()
    # MLflow's process-wide URIs: both go back afterwards, or a client made later with only a
    # tracking URI would read this store's registry.
    previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    client = mlflow.MlflowClient(uri)
    try:
        mlflow.set_experiment(
            experiment_id=client.create_experiment(
                "names", artifact_location=(root / "artifacts").as_uri()
            )
        )
        for name in NAMES:
            _register(client, name)
        _register(client, "plain-model")  # v2
        yield client
    finally:
        mlflow.set_tracking_uri(previous[0])
        mlflow.set_registry_uri(previous[1])
        override.disable()


@pytest.fixture
def mirrored(store, team, db):
    result = registry_sync()
    return result


def test_every_name_mlflow_allows_is_mirrored_with_its_details(mirrored):
    assert mirrored.failed == {}
    assert sorted(RegisteredModel.objects.values_list("name", flat=True)) == sorted(NAMES)
    for name in NAMES:
        mv = ModelVersion.objects.get(registered_model__name=name, version=1)
        assert "python_function" in mv.flavors, name
        assert mv.input_example, name  # read through the download URI, not models:/<name>
    assert ModelVersion.objects.filter(registered_model__name="plain-model").count() == 2


@pytest.mark.parametrize("name", ["o'neil-model", "demo@prod"])
def test_versions_of_such_names_load_and_hash(store, name):
    model = mlflow_client.load_pyfunc(name, 1)
    import pandas as pd

    assert list(model.predict(pd.DataFrame({"x": [1.0, 2.0]}))) == [0, 0]
    assert len(mlflow_client.artifact_digest(name, 1)) == 64


def test_pages_of_such_names_render(mirrored, client, data_scientist):
    client.force_login(data_scientist)
    for mv in ModelVersion.objects.select_related("registered_model"):
        assert client.get(mv.registered_model.get_absolute_url()).status_code == 200, mv
        assert client.get(mv.get_absolute_url()).status_code == 200, mv
    assert client.get("/api/models/o'neil-model").json()["name"] == "o'neil-model"


def _artifact_dir(client, name: str, version: int) -> Path:
    return Path(unquote(urlparse(client.get_model_version_download_uri(name, version)).path))


def test_one_bad_model_never_stops_the_others(store, team, db, client, data_scientist, caplog):
    """A model whose artifacts are gone (a real failure of the MLflow store) is reported on
    the registry page and in the log; every other model syncs."""
    _register(store, "broken-model")
    folder = _artifact_dir(store, "broken-model", 1)
    shutil.rmtree(folder)
    try:
        with caplog.at_level(logging.ERROR, logger="registry.services"):
            result = registry_sync()
        assert set(result.failed) == {"broken-model"}
        assert "v1" in result.failed["broken-model"]
        assert "broken-model" in caplog.text
        synced = set(
            ModelVersion.objects.values_list("registered_model__name", flat=True).distinct()
        )
        assert synced == set(NAMES)  # all the others
        broken = RegisteredModel.objects.get(name="broken-model")
        assert broken.sync_error.startswith("v1:") and broken.sync_error_at is not None
        assert AuditEvent.objects.filter(action="registry.sync_failed").count() == 1
        client.force_login(data_scientist)
        page = client.get("/registry/").content.decode()
        assert 'data-testid="sync-problems"' in page and "broken-model" in page
        # A second failing sync does not audit the same failure again.
        registry_sync()
        assert AuditEvent.objects.filter(action="registry.sync_failed").count() == 1
    finally:
        store.delete_registered_model("broken-model")
    result = registry_sync()
    assert result.failed == {}
    assert RegisteredModel.objects.get(name="broken-model").deleted_at is not None
    assert 'data-testid="sync-problems"' not in client.get("/registry/").content.decode()


def test_a_model_the_database_refuses_does_not_stop_the_others(store, team, db, monkeypatch):
    """A failure while writing one model (here: the database refuses its row) rolls back that
    model only."""
    from registry import services

    real = services._write_model

    def refuse(rm, *args, **kwargs):
        if rm.name == "demo@prod":
            raise ValueError("refused")
        return real(rm, *args, **kwargs)

    monkeypatch.setattr(services, "_write_model", refuse)
    result = registry_sync()
    assert result.failed == {"demo@prod": "not written: ValueError: refused"}
    names = set(RegisteredModel.objects.values_list("name", flat=True))
    assert names == set(NAMES) - {"demo@prod"}


@pytest.fixture
def live_v1(mirrored, data_scientist):
    """``plain-model`` v1 live on an endpoint in staging (rows, no real rollout)."""
    v1 = ModelVersion.objects.get(registered_model__name="plain-model", version=1)
    endpoint = Endpoint.objects.create(
        name="plain-staging",
        environment=Environment.objects.get(name="staging"),
        registered_model=v1.registered_model,
    )
    req = DeploymentRequest.objects.create(
        model_version=v1,
        endpoint=endpoint,
        justification="test",
        requester=data_scientist,
        status=DeploymentRequest.Status.LIVE,
    )
    Deployment.objects.create(
        endpoint=endpoint,
        model_version=v1,
        request=req,
        status=Deployment.Status.LIVE,
        traffic_weight=100,
        live_at=timezone.now(),
    )
    return v1, endpoint


def test_a_version_deleted_in_mlflow_is_marked_refused_and_flagged(
    store, live_v1, client, data_scientist
):
    v1, endpoint = live_v1
    v2 = ModelVersion.objects.get(registered_model__name="plain-model", version=2)
    store.delete_model_version("plain-model", "2")
    store.delete_model_version("plain-model", "1")
    try:
        result = registry_sync()
        assert result.versions_deleted == 2 and result.failed == {}
        v1.refresh_from_db()
        v2.refresh_from_db()
        assert v1.deleted_at is not None and v2.deleted_at is not None
        assert AuditEvent.objects.filter(action="registry.version_deleted").count() == 2
        registry_sync()  # marked once
        assert AuditEvent.objects.filter(action="registry.version_deleted").count() == 2

        # It cannot be requested: the service, the form and the API refuse it.
        with pytest.raises(ValidationError, match="deleted in MLflow"):
            rollout_services.deployment_request_create(
                requester=data_scientist,
                model_version=v2,
                environment=Environment.objects.get(name="staging"),
                justification="again",
            )
        client.force_login(data_scientist)
        staging = Environment.objects.get(name="staging")
        form = client.post(
            reverse("rollouts:request_create", args=["plain-model", 2]),
            {"environment": staging.pk, "strategy": "direct", "justification": "j"},
        )
        assert form.status_code == 400 and "deleted in MLflow" in form.content.decode()
        api = client.post(
            "/api/requests",
            {"model": "plain-model", "version": 2, "environment": "staging", "justification": "j"},
            content_type="application/json",
        )
        assert api.status_code == 400 and "deleted in MLflow" in api.content.decode()
        assert not DeploymentRequest.objects.filter(model_version=v2).exists()
        page = client.get(v2.get_absolute_url()).content.decode()
        assert 'data-testid="request-deployment"' not in page and "deleted in MLflow" in page

        # The live deployment of v1 is flagged on its endpoint pages, and keeps serving.
        for url in (
            reverse("monitoring:endpoint", args=[endpoint.name]),
            reverse("rollouts:endpoint_timeline", args=[endpoint.name]),
        ):
            response = client.get(url)
            assert response.status_code == 200, url
            text = " ".join(response.content.decode().split())
            assert 'data-testid="deleted-version-live"' in text, url
            assert "keeps serving from the loaded copy until a person acts" in text
        assert Deployment.objects.get(endpoint=endpoint).status == Deployment.Status.LIVE
    finally:
        store.delete_registered_model("plain-model")
        _register(store, "plain-model")
        _register(store, "plain-model")

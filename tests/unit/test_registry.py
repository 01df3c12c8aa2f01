"""Mirroring the MLflow registry: idempotent sync, alias changes, and the "Sync now" button."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import mlflow
import pytest
from django.conf import settings

from portal.models import AuditEvent
from registry import mlflow_client, services
from registry.models import ModelVersion, RegisteredModel
from tests.conftest import REGISTERED_MODEL


@pytest.fixture
def _no_mlflow_aliases(mlflow_store):
    """The MLflow store lives for the whole session: start and end without aliases."""
    client = mlflow.MlflowClient(settings.MLFLOW_TRACKING_URI)

    def clear():
        for alias in list(client.get_registered_model(REGISTERED_MODEL).aliases):
            client.delete_registered_model_alias(REGISTERED_MODEL, alias)

    clear()
    yield client
    clear()


def _sync_events() -> int:
    return AuditEvent.objects.filter(action="registry.sync").count()


# --- registry_sync ---------------------------------------------------------------------------


def test_first_sync_mirrors_models_and_versions(team, _no_mlflow_aliases):
    result = services.registry_sync()
    assert result.models_created == 1
    assert result.versions_created == 2
    model = RegisteredModel.objects.get(name=REGISTERED_MODEL)
    assert model.team == team  # from the registered model's MLflow tag "team"
    assert list(model.versions.order_by("version").values_list("version", "status")) == [
        (1, "READY"),
        (2, "READY"),
    ]
    v2 = model.versions.get(version=2)
    assert v2.storage_location and v2.run_id
    assert "sklearn" in v2.flavors
    assert v2.metrics["accuracy"] > 0.9
    event = AuditEvent.objects.get(action="registry.sync")
    assert event.actor_label == "system"
    assert event.after["versions"] == [1, 2]


def test_sync_is_idempotent(synced):
    versions = ModelVersion.objects.count()
    events = AuditEvent.objects.count()
    synced_at = {mv.pk: mv.synced_at for mv in ModelVersion.objects.all()}

    result = services.registry_sync()

    assert result == services.SyncResult()
    assert ModelVersion.objects.count() == versions
    assert AuditEvent.objects.count() == events
    # Versions already mirrored are not rewritten.
    assert {mv.pk: mv.synced_at for mv in ModelVersion.objects.all()} == synced_at


def test_sync_mirrors_alias_moves(synced, _no_mlflow_aliases):
    _no_mlflow_aliases.set_registered_model_alias(REGISTERED_MODEL, "production", "1")
    result = services.registry_sync()
    assert (result.aliases_changed, result.versions_created, result.versions_updated) == (1, 0, 0)
    assert RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases == {"production": 1}
    event = AuditEvent.objects.filter(action="registry.sync").latest("id")
    assert (event.before["aliases"], event.after["aliases"]) == ({}, {"production": 1})

    _no_mlflow_aliases.delete_registered_model_alias(REGISTERED_MODEL, "production")
    services.registry_sync()
    assert RegisteredModel.objects.get(name=REGISTERED_MODEL).aliases == {}


def test_sync_of_a_version_without_signature_is_idempotent(db, monkeypatch):
    """A version logged without a signature (allowed by MLflow) must not be fetched, rewritten
    and audited again on every periodic sync."""
    base = mlflow_client.VersionInfo(
        name="no-signature",
        version=1,
        run_id="r1",
        source="models:/m-1",
        status="READY",
        description="",
        tags={},
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )
    remote = [
        mlflow_client.RegisteredModelInfo(
            name="no-signature",
            description="",
            tags={},
            aliases={},
            created_at=base.created_at,
            updated_at=base.created_at,
            versions=[base],
        )
    ]
    fetched: list[int] = []

    def details(info):
        fetched.append(info.version)
        return dataclasses.replace(
            info, storage_location="file:///m-1", flavors=["python_function"]
        )

    monkeypatch.setattr(mlflow_client, "list_registered_models", lambda: remote)
    monkeypatch.setattr(mlflow_client, "version_details", details)

    assert services.registry_sync().versions_created == 1
    assert ModelVersion.objects.get(registered_model__name="no-signature").signature is None
    events = AuditEvent.objects.count()

    assert services.registry_sync() == services.SyncResult()
    assert fetched == [1]
    assert AuditEvent.objects.count() == events


def test_sync_refetches_a_version_whose_status_changed(db, monkeypatch):
    pending = mlflow_client.VersionInfo(
        name="late",
        version=1,
        run_id="r1",
        source="s",
        status="PENDING_REGISTRATION",
        description="",
        tags={},
        created_at=None,
    )
    state = {"version": pending}
    monkeypatch.setattr(
        mlflow_client,
        "list_registered_models",
        lambda: [
            mlflow_client.RegisteredModelInfo(
                name="late",
                description="",
                tags={},
                aliases={},
                created_at=None,
                updated_at=None,
                versions=[state["version"]],
            )
        ],
    )
    monkeypatch.setattr(mlflow_client, "version_details", lambda info: info)
    services.registry_sync()
    state["version"] = dataclasses.replace(pending, status="READY")
    result = services.registry_sync()
    assert (result.versions_created, result.versions_updated) == (0, 1)
    assert ModelVersion.objects.get(registered_model__name="late").status == "READY"


def test_unreachable_mlflow_writes_nothing(db, monkeypatch):
    def down():
        raise mlflow_client.RegistryError("MLflow is unreachable")

    monkeypatch.setattr(mlflow_client, "list_registered_models", down)
    with pytest.raises(mlflow_client.RegistryError):
        services.registry_sync()
    assert not RegisteredModel.objects.exists()
    assert not AuditEvent.objects.exists()


# --- "Sync now" ---------------------------------------------------------------------------------


def test_sync_now_by_data_scientist_mirrors(
    client, data_scientist, _no_mlflow_aliases, django_capture_on_commit_callbacks
):
    client.force_login(data_scientist)
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post("/registry/sync")
    assert response.status_code == 302
    assert response["Location"] == "/registry/"
    assert len(callbacks) == 1
    assert ModelVersion.objects.filter(registered_model__name=REGISTERED_MODEL).count() == 2
    event = AuditEvent.objects.get(action="registry.sync")
    assert event.actor == data_scientist


@pytest.mark.parametrize("persona", ["reviewer", "platform_admin"])
def test_sync_now_allowed_personas(
    request, client, persona, django_capture_on_commit_callbacks, monkeypatch
):
    from registry import tasks

    sent: list[object] = []
    monkeypatch.setattr(tasks.sync_registry, "delay", lambda *args: sent.append(args))
    user = request.getfixturevalue(persona)
    client.force_login(user)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post("/registry/sync").status_code == 302
    assert sent == [(user.pk,)]


@pytest.mark.parametrize("persona", ["outsider", "manager"])
def test_sync_now_forbidden(request, client, persona, django_capture_on_commit_callbacks):
    client.force_login(request.getfixturevalue(persona))
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post("/registry/sync")
    assert response.status_code == 403
    assert callbacks == []
    assert not RegisteredModel.objects.exists()


def test_sync_now_anonymous_goes_to_login(client, db, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = client.post("/registry/sync")
    assert response.status_code == 302
    assert response["Location"].startswith("/login/?next=/registry/sync")
    assert callbacks == []
    assert not RegisteredModel.objects.exists()


def test_sync_now_needs_post(client, data_scientist):
    client.force_login(data_scientist)
    assert client.get("/registry/sync").status_code == 405


def test_sync_now_does_not_redirect_off_site(
    client, data_scientist, django_capture_on_commit_callbacks, monkeypatch
):
    from registry import tasks

    monkeypatch.setattr(tasks.sync_registry, "delay", lambda *args: None)
    client.force_login(data_scientist)
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/registry/sync", {"next": "https://evil.example/phish"})
        assert response["Location"] == "/registry/"
        response = client.post("/registry/sync", {"next": f"/registry/{REGISTERED_MODEL}/"})
        assert response["Location"] == f"/registry/{REGISTERED_MODEL}/"

"""Writes of the registry app: mirroring MLflow into the portal's tables."""

from __future__ import annotations

from dataclasses import dataclass

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from portal.audit import audit_record
from portal.models import Team
from registry import mlflow_client
from registry.models import ModelVersion, RegisteredModel


@dataclass(frozen=True)
class SyncResult:
    models_created: int = 0
    versions_created: int = 0
    versions_updated: int = 0
    aliases_changed: int = 0


def _needs_details(known: ModelVersion | None, info: mlflow_client.VersionInfo) -> bool:
    # Details are fetched when a version is new or its status moved (e.g. PENDING_REGISTRATION
    # -> READY). A READY version logged without a signature keeps ``signature`` None for good,
    # so "no signature yet" must not trigger a re-fetch: it would rewrite and audit the
    # version on every periodic sync.
    return known is None or known.status != info.status


def registry_sync(*, actor: User | None = None) -> SyncResult:
    """Mirror every registered model and version from MLflow.

    MLflow is read first, outside any transaction; the mirror is then written in one
    transaction, with one audit event per registered model that changed. Run details (metrics,
    params, signature, input example) are fetched only for new or changed versions.

    Raises:
        mlflow_client.RegistryError: MLflow is unreachable; nothing is written.
    """
    remote = mlflow_client.list_registered_models()
    known = {
        (mv.registered_model.name, mv.version): mv
        for mv in ModelVersion.objects.select_related("registered_model")
    }
    detailed = {
        (v.name, v.version): mlflow_client.version_details(v)
        for rm in remote
        for v in rm.versions
        if _needs_details(known.get((v.name, v.version)), v)
    }
    return _write_mirror(remote, detailed, actor=actor)


@transaction.atomic
def _write_mirror(
    remote: list[mlflow_client.RegisteredModelInfo],
    detailed: dict[tuple[str, int], mlflow_client.VersionInfo],
    *,
    actor: User | None,
) -> SyncResult:
    now = timezone.now()
    counts = {
        "models_created": 0,
        "versions_created": 0,
        "versions_updated": 0,
        "aliases_changed": 0,
    }
    for rm in remote:
        model, created = RegisteredModel.objects.select_for_update().get_or_create(
            name=rm.name, defaults={"synced_at": now}
        )
        before_aliases = dict(model.aliases)
        before_versions = sorted(model.versions.values_list("version", flat=True))
        team_slug = rm.tags.get("team")
        if team_slug:  # without the tag, keep what a platform admin assigned
            model.team = Team.objects.filter(slug=team_slug).first() or model.team
        model.description = rm.description
        model.tags = rm.tags
        model.aliases = rm.aliases
        model.mlflow_created_at = rm.created_at
        model.mlflow_updated_at = rm.updated_at
        model.synced_at = now
        model.save()
        counts["models_created"] += created
        changed_versions = []
        for info in rm.versions:
            full = detailed.get((info.name, info.version))
            if full is None:
                continue
            _, version_created = ModelVersion.objects.update_or_create(
                registered_model=model,
                version=info.version,
                defaults={
                    "run_id": full.run_id,
                    "source": full.source,
                    "storage_location": full.storage_location,
                    "status": full.status,
                    "description": full.description,
                    "tags": full.tags,
                    "flavors": full.flavors,
                    "signature": full.signature,
                    "input_example": full.input_example,
                    "metrics": full.metrics,
                    "params": full.params,
                    "mlflow_created_at": full.created_at,
                    "synced_at": now,
                },
            )
            counts["versions_created" if version_created else "versions_updated"] += 1
            changed_versions.append(info.version)
        aliases_changed = before_aliases != rm.aliases
        counts["aliases_changed"] += aliases_changed
        if created or changed_versions or aliases_changed:
            audit_record(
                actor=actor,
                action="registry.sync",
                obj=model,
                registered_model=model.name,
                before={"versions": before_versions, "aliases": before_aliases},
                after={"versions": [v.version for v in rm.versions], "aliases": rm.aliases},
            )
    return SyncResult(**counts)


def registry_set_alias(*, model_version: ModelVersion, alias: str, actor: User | None) -> None:
    """Move an MLflow alias to ``model_version`` and mirror it, with one audit event.

    Raises:
        mlflow_client.RegistryError: MLflow refused; the mirror is left unchanged.
    """
    name = model_version.registered_model.name
    mlflow_client.set_alias(name, alias, model_version.version)
    with transaction.atomic():
        model = RegisteredModel.objects.select_for_update().get(
            pk=model_version.registered_model_id
        )
        before = model.aliases.get(alias)
        model.aliases = {**model.aliases, alias: model_version.version}
        model.save(update_fields=["aliases"])
        audit_record(
            actor=actor,
            action="registry.alias_set",
            obj=model_version,
            registered_model=name,
            environment=alias,
            before={"alias": alias, "version": before},
            after={"alias": alias, "version": model_version.version},
        )

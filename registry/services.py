"""Writes of the registry app: mirroring MLflow into the portal's tables."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from django.contrib.auth.models import User
from django.db import transaction
from django.utils import timezone

from portal.audit import audit_record
from portal.models import Team
from registry import mlflow_client
from registry.models import ModelVersion, RegisteredModel

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SyncResult:
    models_created: int = 0
    versions_created: int = 0
    versions_updated: int = 0
    aliases_changed: int = 0
    versions_deleted: int = 0
    #: ``{model name: why it (or some of its versions) could not be mirrored}``
    failed: dict[str, str] = field(default_factory=dict)


def _needs_details(known: ModelVersion | None, info: mlflow_client.VersionInfo) -> bool:
    # Details are fetched when a version is new or its status moved (e.g. PENDING_REGISTRATION
    # -> READY). A READY version logged without a signature keeps ``signature`` None for good,
    # so "no signature yet" must not trigger a re-fetch: it would rewrite and audit the
    # version on every periodic sync. A version marked deleted that MLflow lists again (the
    # model was deleted and registered anew) is a new version under an old number.
    return known is None or known.status != info.status or known.deleted_at is not None


def _error_text(exc: BaseException) -> str:
    text = (
        str(exc) if isinstance(exc, mlflow_client.RegistryError) else f"{type(exc).__name__}: {exc}"
    )
    return text[:2000]


def registry_sync(*, actor: User | None = None) -> SyncResult:
    """Mirror every registered model and version from MLflow, whatever their names.

    MLflow is read first, outside any transaction; then each registered model is written in a
    transaction of its own, with one audit event per model that changed. Run details (metrics,
    params, signature, input example) are fetched only for new or changed versions.

    One bad model never stops the others: a version whose details cannot be read, or a model
    that cannot be written, is skipped, logged, kept in ``SyncResult.failed`` and recorded on
    the model (``RegisteredModel.sync_error``, shown on the registry pages) until a sync
    mirrors it. A version (or model) that MLflow no longer lists is marked deleted
    (``deleted_at``), never removed: requests, deployments and logs still point at it.

    Raises:
        mlflow_client.RegistryError: MLflow cannot be listed at all; nothing is written.
    """
    remote = mlflow_client.list_registered_models()
    known = {
        (mv.registered_model.name, mv.version): mv
        for mv in ModelVersion.objects.select_related("registered_model")
    }
    detailed: dict[tuple[str, int], mlflow_client.VersionInfo] = {}
    problems: dict[str, list[str]] = {}
    for rm in remote:
        for v in rm.versions:
            if not _needs_details(known.get((v.name, v.version)), v):
                continue
            try:
                detailed[(v.name, v.version)] = mlflow_client.version_details(v)
            except Exception as exc:  # noqa: BLE001 - one bad model must not stop the others
                logger.error("registry sync: %r v%s could not be read: %s", v.name, v.version, exc)
                problems.setdefault(rm.name, []).append(f"v{v.version}: {_error_text(exc)}")
    counts = dict.fromkeys(
        ("models_created", "versions_created", "versions_updated", "aliases_changed"), 0
    )
    counts["versions_deleted"] = 0
    failed: dict[str, str] = {}
    now = timezone.now()
    for rm in remote:
        error = "; ".join(problems.get(rm.name, []))
        try:
            changed = _write_model(rm, detailed, error=error, now=now, actor=actor)
        except Exception as exc:  # noqa: BLE001 - e.g. a value the database refuses
            logger.exception("registry sync: %r could not be written", rm.name)
            error = f"{error}; " if error else ""
            error += f"not written: {_error_text(exc)}"
            _record_sync_error(rm.name, error, now=now, actor=actor)
        else:
            for key, value in changed.items():
                counts[key] += value
        if error:
            failed[rm.name] = error
    counts["versions_deleted"] += _mark_gone_models({rm.name for rm in remote}, now, actor)
    return SyncResult(**counts, failed=failed)


@transaction.atomic
def _write_model(
    rm: mlflow_client.RegisteredModelInfo,
    detailed: dict[tuple[str, int], mlflow_client.VersionInfo],
    *,
    error: str,
    now: datetime,
    actor: User | None,
) -> dict[str, int]:
    """Mirror one registered model; returns its counts (the keys of :class:`SyncResult`)."""
    counts = {
        "models_created": 0,
        "versions_created": 0,
        "versions_updated": 0,
        "aliases_changed": 0,
        "versions_deleted": 0,
    }
    model, created = RegisteredModel.objects.select_for_update().get_or_create(
        name=rm.name, defaults={"synced_at": now}
    )
    before_aliases = dict(model.aliases)
    before_versions = sorted(
        model.versions.filter(deleted_at__isnull=True).values_list("version", flat=True)
    )
    before_error = model.sync_error
    team_slug = rm.tags.get("team")
    if team_slug:  # without the tag, keep what a platform admin assigned
        model.team = Team.objects.filter(slug=team_slug).first() or model.team
    model.description = rm.description
    model.tags = rm.tags
    model.aliases = rm.aliases
    model.mlflow_created_at = rm.created_at
    model.mlflow_updated_at = rm.updated_at
    model.synced_at = now
    model.deleted_at = None
    model.sync_error = error
    model.sync_error_at = now if error else None
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
                "deleted_at": None,
            },
        )
        counts["versions_created" if version_created else "versions_updated"] += 1
        changed_versions.append(info.version)
    listed = {v.version for v in rm.versions}
    gone = model.versions.filter(deleted_at__isnull=True).exclude(version__in=listed)
    deleted = _mark_deleted(gone, now, actor)
    counts["versions_deleted"] += len(deleted)
    aliases_changed = before_aliases != rm.aliases
    counts["aliases_changed"] += aliases_changed
    if created or changed_versions or aliases_changed or deleted:
        audit_record(
            actor=actor,
            action="registry.sync",
            obj=model,
            registered_model=model.name,
            before={"versions": before_versions, "aliases": before_aliases},
            after={
                "versions": sorted(listed),
                "aliases": rm.aliases,
                "deleted": deleted,
            },
        )
    if error != before_error:
        _audit_sync_error(model, before_error, error, actor)
    return counts


def _mark_deleted(versions, now: datetime, actor: User | None) -> list[int]:
    """Mark versions MLflow no longer lists as deleted, one audit event each; returns their
    numbers. A live deployment of one keeps serving from its loaded copy: its endpoint page
    says so (``rollouts.selectors.live_deployments_of_deleted_versions``)."""
    numbers = []
    for mv in versions.select_related("registered_model").select_for_update(of=("self",)):
        mv.deleted_at = now
        mv.save(update_fields=["deleted_at"])
        audit_record(
            actor=actor,
            action="registry.version_deleted",
            obj=mv,
            registered_model=mv.registered_model.name,
            before={"deleted_at": None},
            after={"deleted_at": now.isoformat()},
        )
        logger.warning("registry sync: %s was deleted in MLflow", mv)
        numbers.append(mv.version)
    return sorted(numbers)


def _mark_gone_models(listed: set[str], now: datetime, actor: User | None) -> int:
    """Models MLflow no longer lists at all: the model and all its versions are marked
    deleted. Returns the number of versions marked."""
    marked = 0
    for pk in (
        RegisteredModel.objects.filter(deleted_at__isnull=True)
        .exclude(name__in=listed)
        .values_list("pk", flat=True)
    ):
        with transaction.atomic():
            model = RegisteredModel.objects.select_for_update().get(pk=pk)
            numbers = _mark_deleted(model.versions.filter(deleted_at__isnull=True), now, actor)
            before_error = model.sync_error
            # A model that is gone has nothing left to mirror: its last failure no longer applies.
            model.deleted_at, model.sync_error, model.sync_error_at = now, "", None
            model.save(update_fields=["deleted_at", "sync_error", "sync_error_at"])
            audit_record(
                actor=actor,
                action="registry.model_deleted",
                obj=model,
                registered_model=model.name,
                before={"deleted_at": None, "sync_error": before_error},
                after={"deleted_at": now.isoformat(), "versions": numbers, "sync_error": ""},
            )
            marked += len(numbers)
    return marked


def _record_sync_error(name: str, error: str, *, now: datetime, actor: User | None) -> None:
    """Put a model's failure on its row when the row exists (a model whose very row cannot be
    written is only logged and returned in ``SyncResult.failed``)."""
    try:
        with transaction.atomic():
            model = RegisteredModel.objects.select_for_update().filter(name=name).first()
            if model is None:
                return
            before = model.sync_error
            model.sync_error, model.sync_error_at = error, now
            model.save(update_fields=["sync_error", "sync_error_at"])
            if before != error:
                _audit_sync_error(model, before, error, actor)
    except Exception:  # noqa: BLE001 - the name itself may be what the database refuses
        logger.exception("registry sync: the failure of %r could not be recorded", name)


def _audit_sync_error(model: RegisteredModel, before: str, after: str, actor: User | None) -> None:
    audit_record(
        actor=actor,
        action="registry.sync_failed" if after else "registry.sync_recovered",
        obj=model,
        registered_model=model.name,
        before={"sync_error": before},
        after={"sync_error": after},
    )


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


def registry_delete_alias(
    *, registered_model: RegisteredModel, alias: str, actor: User | None
) -> None:
    """Remove an MLflow alias and its mirror, with one audit event; nothing when it is unset.

    Raises:
        mlflow_client.RegistryError: MLflow refused; the mirror is left unchanged.
    """
    mlflow_client.delete_alias(registered_model.name, alias)
    with transaction.atomic():
        model = RegisteredModel.objects.select_for_update().get(pk=registered_model.pk)
        if alias not in model.aliases:
            return
        before = model.aliases[alias]
        model.aliases = {k: v for k, v in model.aliases.items() if k != alias}
        model.save(update_fields=["aliases"])
        audit_record(
            actor=actor,
            action="registry.alias_removed",
            obj=model,
            registered_model=model.name,
            before={"alias": alias, "version": before},
        )

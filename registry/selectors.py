"""Reads of the registry app."""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Count, Max, Q, QuerySet

from portal.roles import can_request_deployment, sees_all_teams
from registry.models import ModelVersion, RegisteredModel


def registered_models_visible_to(user: User | AnonymousUser) -> QuerySet[RegisteredModel]:
    """The one place that scopes registered models: everything for reviewers, managers and
    platform admins; a data scientist's own teams' models; nothing for anyone else."""
    qs = RegisteredModel.objects.select_related("team")
    if sees_all_teams(user):
        return qs
    if can_request_deployment(user):
        return qs.filter(team__members=user)
    return qs.none()


def model_versions_visible_to(user: User | AnonymousUser) -> QuerySet[ModelVersion]:
    return ModelVersion.objects.select_related("registered_model__team").filter(
        registered_model__in=registered_models_visible_to(user)
    )


def registered_models_list(
    user: User | AnonymousUser, *, search: str = "", team: str = ""
) -> QuerySet[RegisteredModel]:
    present = Q(versions__deleted_at__isnull=True)
    qs = registered_models_visible_to(user).annotate(
        version_count=Count("versions", filter=present),
        latest_version=Max("versions__version", filter=present),
    )
    if search:
        qs = qs.filter(Q(name__icontains=search) | Q(description__icontains=search))
    if team:
        qs = qs.filter(team__slug=team)
    return qs.order_by("name")


def model_version_get(user: User | AnonymousUser, *, name: str, version: int) -> ModelVersion:
    """Raises ModelVersion.DoesNotExist, also when ``user`` may not see it."""
    return model_versions_visible_to(user).get(registered_model__name=name, version=version)


def registered_models_with_sync_errors(user: User | AnonymousUser) -> QuerySet[RegisteredModel]:
    """The visible models the last sync could not (fully) mirror, with ``sync_error``."""
    return registered_models_visible_to(user).exclude(sync_error="").order_by("name")

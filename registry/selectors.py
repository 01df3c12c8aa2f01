"""Reads of the registry app."""

from __future__ import annotations

from django.db.models import Count, Max, Q, QuerySet

from registry.models import ModelVersion, RegisteredModel


def registered_models_list(*, search: str = "") -> QuerySet[RegisteredModel]:
    qs = RegisteredModel.objects.annotate(
        version_count=Count("versions"), latest_version=Max("versions__version")
    )
    if search:
        qs = qs.filter(Q(name__icontains=search) | Q(description__icontains=search))
    return qs.order_by("name")


def model_version_get(*, name: str, version: int) -> ModelVersion:
    """Raises ModelVersion.DoesNotExist."""
    return ModelVersion.objects.select_related("registered_model").get(
        registered_model__name=name, version=version
    )

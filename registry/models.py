"""Mirror of MLflow's registered models and model versions.

MLflow stays the source of truth for artifacts; these rows let the portal list, search and join
without calling MLflow on every page.
"""

from __future__ import annotations

from django.db import models
from django.urls import reverse

from portal.models import Team


class RegisteredModel(models.Model):
    name = models.CharField(max_length=255, unique=True)
    team = models.ForeignKey(
        Team,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="registered_models",
        help_text="owner; set from the MLflow tag 'team' on sync, or by a platform admin",
    )
    description = models.TextField(blank=True)
    tags = models.JSONField(default=dict, blank=True)
    aliases = models.JSONField(default=dict, blank=True, help_text="alias -> version number")
    mlflow_created_at = models.DateTimeField(null=True, blank=True)
    mlflow_updated_at = models.DateTimeField(null=True, blank=True)
    synced_at = models.DateTimeField()
    deleted_at = models.DateTimeField(
        null=True, blank=True, help_text="when a sync found the model gone from MLflow"
    )
    sync_error = models.TextField(
        blank=True, help_text="why the last sync could not mirror (part of) this model"
    )
    sync_error_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("registry:model", args=[self.name])


class ModelVersion(models.Model):
    registered_model = models.ForeignKey(
        RegisteredModel, on_delete=models.CASCADE, related_name="versions"
    )
    version = models.PositiveIntegerField()
    run_id = models.CharField(max_length=64, blank=True)
    source = models.CharField(max_length=1000, blank=True)
    storage_location = models.CharField(max_length=1000, blank=True)
    status = models.CharField(max_length=32, blank=True)
    description = models.TextField(blank=True)
    tags = models.JSONField(default=dict, blank=True)
    flavors = models.JSONField(default=list, blank=True)
    signature = models.JSONField(
        null=True, blank=True, help_text="{'inputs': [...], 'outputs': [...], 'params': [...]}"
    )
    input_example = models.JSONField(null=True, blank=True, help_text="scoring payload")
    metrics = models.JSONField(default=dict, blank=True)
    params = models.JSONField(default=dict, blank=True)
    mlflow_created_at = models.DateTimeField(null=True, blank=True)
    synced_at = models.DateTimeField()
    deleted_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="when a sync found the version gone from MLflow; it can no longer be requested",
    )

    class Meta:
        ordering = ["registered_model__name", "-version"]
        constraints = [
            models.UniqueConstraint(
                fields=["registered_model", "version"], name="unique_version_per_model"
            )
        ]

    def __str__(self) -> str:
        return f"{self.registered_model.name} v{self.version}"

    def get_absolute_url(self) -> str:
        return reverse("registry:version", args=[self.registered_model.name, self.version])

    @property
    def is_deleted(self) -> bool:
        return self.deleted_at is not None

    @property
    def input_columns(self) -> list[dict]:
        return list((self.signature or {}).get("inputs") or [])

"""Environments, endpoints, deployment requests and their reviews, deployments, API keys, and the
prediction log that the serving data plane writes."""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.urls import reverse

from registry.models import ModelVersion, RegisteredModel


class Environment(models.Model):
    """A stage a model version is released to, e.g. ``staging`` or ``production``.

    The environment's name is also the MLflow alias that follows its live version.
    """

    name = models.SlugField(max_length=64, unique=True)
    description = models.CharField(max_length=255, blank=True)
    order = models.PositiveSmallIntegerField(default=0, help_text="position on the promotion path")

    class Meta:
        ordering = ["order", "name"]

    def __str__(self) -> str:
        return self.name


class Endpoint(models.Model):
    """A named real-time serving endpoint of one registered model in one environment."""

    name = models.SlugField(max_length=100, unique=True)
    environment = models.ForeignKey(Environment, on_delete=models.PROTECT, related_name="endpoints")
    registered_model = models.ForeignKey(
        RegisteredModel, on_delete=models.PROTECT, related_name="endpoints"
    )
    max_body_bytes = models.PositiveIntegerField(
        null=True, blank=True, help_text="largest scoring request body; empty: SERVING_MAX_BODY_BYTES"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["registered_model", "environment"], name="one_endpoint_per_model_and_env"
            )
        ]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("monitoring:endpoint", args=[self.name])


class Strategy(models.TextChoices):
    DIRECT = "direct", "Direct (all traffic at once)"


class DeploymentRequest(models.Model):
    """A data scientist's request to take one model version to one endpoint."""

    class Status(models.TextChoices):
        AWAITING_REVIEW = "awaiting_review", "Awaiting review"
        APPROVED = "approved", "Approved"
        DEPLOYING = "deploying", "Deploying"
        LIVE = "live", "Live"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"
        FAILED = "failed", "Failed"
        SUPERSEDED = "superseded", "Superseded"

    # The only allowed moves; ``rollouts.services`` raises InvalidTransition for any other.
    TRANSITIONS: dict[str, frozenset[str]] = {
        Status.AWAITING_REVIEW: frozenset({Status.APPROVED, Status.REJECTED, Status.CANCELLED}),
        Status.APPROVED: frozenset({Status.DEPLOYING, Status.CANCELLED}),
        Status.DEPLOYING: frozenset({Status.LIVE, Status.FAILED}),
        Status.LIVE: frozenset({Status.SUPERSEDED}),
        Status.REJECTED: frozenset(),
        Status.CANCELLED: frozenset(),
        Status.FAILED: frozenset(),
        Status.SUPERSEDED: frozenset(),
    }
    ACTIVE = frozenset({Status.AWAITING_REVIEW, Status.APPROVED, Status.DEPLOYING})
    TERMINAL = frozenset(
        {Status.REJECTED, Status.CANCELLED, Status.FAILED, Status.SUPERSEDED}
    )

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="deployment_requests"
    )
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.PROTECT, related_name="deployment_requests"
    )
    strategy = models.CharField(max_length=32, choices=Strategy.choices, default=Strategy.DIRECT)
    justification = models.TextField()
    requester = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="deployment_requests"
    )
    status = models.CharField(
        max_length=32, choices=Status.choices, default=Status.AWAITING_REVIEW, db_index=True
    )
    status_reason = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    live_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"request #{self.pk}: {self.model_version} to {self.endpoint}"

    def get_absolute_url(self) -> str:
        return reverse("rollouts:request", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class Review(models.Model):
    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REJECT = "reject", "Reject"

    request = models.ForeignKey(DeploymentRequest, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reviews"
    )
    decision = models.CharField(max_length=16, choices=Decision.choices)
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["request", "reviewer"], name="one_review_per_person")
        ]

    def __str__(self) -> str:
        return f"{self.reviewer} {self.decision}d request #{self.request_id}"


class Deployment(models.Model):
    """One model version placed on one endpoint, pinned by version number and artifact digest."""

    class Status(models.TextChoices):
        LAUNCHING = "launching", "Launching"
        LIVE = "live", "Live"
        FAILED = "failed", "Failed"
        RETIRED = "retired", "Retired"

    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="deployments")
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="deployments"
    )
    request = models.OneToOneField(
        DeploymentRequest, on_delete=models.PROTECT, related_name="deployment"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.LAUNCHING)
    traffic_weight = models.PositiveSmallIntegerField(default=0, help_text="percent of traffic")
    artifact_digest = models.CharField(max_length=64, blank=True)
    failure_reason = models.TextField(blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    live_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["endpoint", "status"])]

    def __str__(self) -> str:
        return f"{self.model_version} on {self.endpoint} ({self.status})"


class ApiKey(models.Model):
    """A client application's key for the serving API. Only its sha256 is stored."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, help_text="first characters, to recognise a key")
    key_hash = models.CharField(max_length=64, unique=True)
    endpoints = models.ManyToManyField(Endpoint, related_name="api_keys")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    rate_limit_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="scoring requests per minute; empty: unlimited"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class PredictionLog(models.Model):
    """One scored row. A request with k rows writes k entries sharing ``request_id``."""

    request_id = models.UUIDField(default=uuid.uuid4)
    row_index = models.PositiveIntegerField(default=0)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="predictions")
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="predictions"
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="predictions"
    )
    features = models.JSONField()
    prediction = models.JSONField()
    latency_ms = models.FloatField(help_text="server time of the whole request, milliseconds")
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["request_id", "row_index"], name="unique_logged_row")
        ]
        indexes = [models.Index(fields=["endpoint", "model_version", "created_at"])]

    def __str__(self) -> str:
        return f"{self.request_id}[{self.row_index}]"

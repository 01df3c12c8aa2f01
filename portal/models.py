"""The audit log: append-only, hash-chained events for every action in Rollgate."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class AuditEvent(models.Model):
    """One action: who did what to which object, with the state before and after.

    ``hash`` = sha256(``prev_hash`` + canonical JSON of the other fields); see
    ``portal.audit.event_hash``. Editing or deleting a row breaks the chain at that row.
    """

    created_at = models.DateTimeField(db_index=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    actor_label = models.CharField(max_length=150, help_text="username, or 'system' for tasks")
    action = models.CharField(max_length=64, db_index=True)
    object_type = models.CharField(max_length=64)
    object_id = models.CharField(max_length=64)
    object_repr = models.CharField(max_length=255)
    registered_model = models.CharField(max_length=255, blank=True, db_index=True)
    environment = models.CharField(max_length=64, blank=True, db_index=True)
    before = models.JSONField(null=True, blank=True)
    after = models.JSONField(null=True, blank=True)
    prev_hash = models.CharField(max_length=64)
    hash = models.CharField(max_length=64, unique=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["object_type", "object_id"])]

    def __str__(self) -> str:
        return f"#{self.pk} {self.actor_label} {self.action} {self.object_repr}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise PermissionError("audit events are append-only")
        super().save(*args, **kwargs)

    def delete(self, *args, **kwargs):
        raise PermissionError("audit events are append-only")


class AuditChainHead(models.Model):
    """A single row locked while appending, so that concurrent writers form one chain."""

    last_hash = models.CharField(max_length=64, default="0" * 64)
    length = models.PositiveBigIntegerField(default=0)

    def __str__(self) -> str:
        return f"audit chain of {self.length} events, head {self.last_hash[:12]}"


class Team(models.Model):
    """A group of data scientists that owns registered models. Reviewers, managers and platform
    admins see every team's work; data scientists see and request only their teams' models."""

    name = models.CharField(max_length=100, unique=True)
    slug = models.SlugField(max_length=100, unique=True, help_text="matches the MLflow tag 'team'")
    members = models.ManyToManyField(settings.AUTH_USER_MODEL, related_name="teams", blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name


class Lease(models.Model):
    """A named, expiring claim on some work, shared by every process through the database.

    Held by ``holder`` until ``expires_at``; a holder that dies simply lets it lapse, and the
    next claimant after that time takes it over. Acquired and released only through
    :mod:`portal.leases` (one conditional UPDATE, or an INSERT when the name is new).
    """

    name = models.CharField(max_length=200, unique=True)
    holder = models.CharField(max_length=200)
    expires_at = models.DateTimeField(db_index=True)
    acquired_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"lease {self.name} held by {self.holder} until {self.expires_at:%Y-%m-%d %H:%M:%S}"


class WindowCounter(models.Model):
    """How many times ``name`` was counted in the fixed window starting at ``window`` (seconds
    since the epoch, a multiple of the window's length). Shared by every process and replica
    through the database; written only by :mod:`portal.counters` (one upsert a count)."""

    name = models.CharField(max_length=200)
    window = models.BigIntegerField()
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["name", "window"], name="one_counter_per_window")
        ]

    def __str__(self) -> str:
        return f"{self.name} @ {self.window}: {self.count}"

"""Ground truth joined to the prediction log."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from rollouts.models import PredictionLog


class GroundTruth(models.Model):
    """The true label of one logged prediction row, sent later by the client (or a person).

    A second label for the same row replaces the first: clients correct labels.
    """

    prediction = models.OneToOneField(
        PredictionLog, on_delete=models.CASCADE, related_name="ground_truth"
    )
    label = models.JSONField()
    received_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return f"label {self.label!r} for {self.prediction_id}"


class Granularity(models.TextChoices):
    HOUR = "hour", "Hour"
    DAY = "day", "Day"


class StaleWindow(models.Model):
    """An hour of one version on one endpoint whose rollups must be recomputed: new predictions
    or errors were logged in it, or labels arrived for its predictions.

    Written with ``ON CONFLICT`` (bumping ``marked_at``) so that a mark made while the hour is
    being recomputed survives: the refresh deletes only marks it read, unchanged.
    """

    endpoint = models.ForeignKey("rollouts.Endpoint", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="+"
    )
    hour = models.DateTimeField()
    marked_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint", "model_version", "hour"], name="one_stale_mark_per_hour"
            )
        ]

    def __str__(self) -> str:
        return f"stale {self.endpoint_id}/{self.model_version_id} {self.hour:%Y-%m-%d %H:00}"


class Rollup(models.Model):
    """Mergeable figures of one version on one endpoint in one hour or day (see
    :mod:`monitoring.metrics` for what each count means and how figures come from them)."""

    endpoint = models.ForeignKey("rollouts.Endpoint", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="+"
    )
    granularity = models.CharField(max_length=4, choices=Granularity.choices)
    window_start = models.DateTimeField()
    requests = models.PositiveIntegerField(default=0)
    rows = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0, help_text="requests answered 4xx/5xx")
    latency_hist = models.JSONField(default=list, help_text="per request, LATENCY_BOUNDS_MS")
    labeled = models.PositiveIntegerField(default=0)
    task = models.CharField(max_length=16, blank=True, help_text="classification or regression")
    confusion = models.JSONField(default=dict, help_text="{label: {prediction: count}}")
    score_pos_hist = models.JSONField(default=list)
    score_neg_hist = models.JSONField(default=list)
    squared_error_sum = models.FloatField(default=0.0)
    absolute_error_sum = models.FloatField(default=0.0)
    computed_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint", "model_version", "granularity", "window_start"],
                name="one_rollup_per_window",
            )
        ]
        indexes = [models.Index(fields=["endpoint", "granularity", "window_start"])]

    def __str__(self) -> str:
        return f"{self.endpoint_id}/{self.model_version_id} {self.granularity} {self.window_start}"


class DriftRollup(models.Model):
    """Drift of one version's inputs and outputs in one hour or day against its reference.

    ``result`` is :meth:`monitoring.drift.DatasetDrift.as_dict`; ``histograms`` maps a column to
    ``{"kind", "edges" or "categories", "reference", "current"}`` (shares of rows) for the
    reference-vs-current chart of that column.
    """

    endpoint = models.ForeignKey("rollouts.Endpoint", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="+"
    )
    granularity = models.CharField(max_length=4, choices=Granularity.choices)
    window_start = models.DateTimeField()
    rows = models.PositiveIntegerField(default=0)
    reference = models.CharField(max_length=200, help_text="where the reference sample came from")
    drifted = models.BooleanField(null=True, help_text="dataset drift; None: insufficient data")
    share_drifted = models.FloatField(null=True)
    result = models.JSONField(default=dict)
    summary = models.JSONField(
        default=dict, help_text="what pages read: rollups.drift_summary(result), a tenth the size"
    )
    histograms = models.JSONField(default=dict)
    computed_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint", "model_version", "granularity", "window_start"],
                name="one_drift_rollup_per_window",
            )
        ]
        indexes = [models.Index(fields=["endpoint", "granularity", "window_start"])]

    def __str__(self) -> str:
        return f"drift {self.endpoint_id}/{self.model_version_id} {self.granularity} {self.window_start}"


class DriftBaseline(models.Model):
    """A chosen baseline window that replaces the version's training sample as its drift
    reference on one endpoint."""

    endpoint = models.ForeignKey("rollouts.Endpoint", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="+"
    )
    start = models.DateTimeField()
    end = models.DateTimeField()
    chosen_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    chosen_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint", "model_version"], name="one_baseline_per_version"
            ),
            models.CheckConstraint(
                condition=models.Q(end__gt=models.F("start")), name="baseline_end_after_start"
            ),
        ]

    def __str__(self) -> str:
        return f"baseline {self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M}"


class DriftSettings(models.Model):
    """An endpoint's drift thresholds (see :class:`monitoring.drift.Thresholds`); an endpoint
    without a row uses the defaults. ``feature_thresholds`` overrides them per column:
    ``{"mean radius": {"psi_drift": 0.4}}``."""

    endpoint = models.OneToOneField(
        "rollouts.Endpoint", on_delete=models.CASCADE, related_name="drift_settings"
    )
    psi_warning = models.FloatField(default=0.1)
    psi_drift = models.FloatField(default=0.25)
    wasserstein = models.FloatField(default=0.1, help_text="normalised Wasserstein distance")
    jensen_shannon = models.FloatField(default=0.1, help_text="Jensen-Shannon distance, base 2")
    missing_change = models.FloatField(default=0.1, help_text="change in the share of missing")
    drift_share = models.FloatField(
        default=0.5, help_text="dataset drift when this share of features drifted"
    )
    feature_thresholds = models.JSONField(default=dict, blank=True)

    class Meta:
        verbose_name_plural = "drift settings"

    def __str__(self) -> str:
        return f"drift settings of {self.endpoint}"


# ---------------------------------------------------------------------------------------------
# Alerts (see monitoring.alerts for how rules are evaluated)


class AlertKind(models.TextChoices):
    DRIFT = "drift", "Drift"
    ACCURACY_DROP = "accuracy_drop", "Accuracy drop below the offline figure"
    ERROR_RATE = "error_rate", "Error rate"
    LATENCY = "latency", "Latency"
    LABEL_COVERAGE = "label_coverage", "Label coverage"


class AlertAction(models.TextChoices):
    NOTIFY = "notify", "Notify (e-mail and portal)"
    ROLLBACK = "rollback", "Roll back to the previous stable version"
    RETRAINING_REQUEST = "retraining_request", "Open a retraining request"


class AlertRule(models.Model):
    """A condition on one endpoint's rollups, evaluated by Celery beat for its stable version.

    ``threshold`` means, per kind: ``drift`` the dataset's share of drifted features (or, with
    ``feature``, that feature's PSI) at or above which the rule fires, empty meaning "the
    window is flagged as drifted"; ``accuracy_drop`` the tolerance below the version's offline
    accuracy; ``error_rate`` the largest acceptable share of failed requests; ``latency`` the
    largest acceptable ``percentile`` in ms; ``label_coverage`` the smallest acceptable share of
    labeled rows. Validation lives in :func:`monitoring.alerts.alert_rule_validate`.
    """

    endpoint = models.ForeignKey(
        "rollouts.Endpoint", on_delete=models.CASCADE, related_name="alert_rules"
    )
    name = models.CharField(max_length=100, blank=True, help_text="empty: described by its kind")
    kind = models.CharField(max_length=20, choices=AlertKind.choices)
    threshold = models.FloatField(null=True, blank=True)
    feature = models.CharField(
        max_length=255, blank=True, help_text="drift only: one column instead of the dataset"
    )
    granularity = models.CharField(
        max_length=4,
        choices=Granularity.choices,
        default=Granularity.HOUR,
        help_text="drift only: which drift windows are read",
    )
    percentile = models.PositiveSmallIntegerField(
        choices=[(95, "p95"), (99, "p99")], default=95, help_text="latency only"
    )
    window_hours = models.PositiveIntegerField(
        default=24, help_text="evaluation window: the last N hours"
    )
    min_samples = models.PositiveIntegerField(
        default=100,
        help_text="below this many samples the figure is undefined: no firing, no resolving",
    )
    label_delay_hours = models.PositiveIntegerField(
        default=24, help_text="label coverage only: hours younger than this are not judged"
    )
    action = models.CharField(
        max_length=20, choices=AlertAction.choices, default=AlertAction.NOTIFY
    )
    enabled = models.BooleanField(default=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    #: Fields a rule's editor may change (the endpoint is fixed once created).
    EDITABLE = (
        "name",
        "kind",
        "threshold",
        "feature",
        "granularity",
        "percentile",
        "window_hours",
        "min_samples",
        "label_delay_hours",
        "action",
        "enabled",
    )

    class Meta:
        ordering = ["endpoint__name", "pk"]

    def __str__(self) -> str:
        return f"{self.label} on {self.endpoint}" if self.endpoint_id else self.label

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        if self.kind == AlertKind.LATENCY:
            return f"p{self.percentile} latency"
        if self.kind == AlertKind.DRIFT and self.feature:
            return f"drift of {self.feature}"
        return AlertKind(self.kind).label if self.kind in AlertKind.values else self.kind

    def as_dict(self) -> dict:
        """The rule's settings as plain data, for audit events and alert evidence."""
        return {"id": self.pk, "endpoint": self.endpoint.name} | {
            f: getattr(self, f) for f in self.EDITABLE
        }


class Alert(models.Model):
    """One firing of a rule: open until a person acknowledges it or the condition clears.

    At most one alert per rule is active (open or acknowledged); it resolves itself when the
    rule's figure is defined again and no longer crosses the threshold, or when the version it
    fired on no longer serves.
    """

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        ACKNOWLEDGED = "acknowledged", "Acknowledged"
        RESOLVED = "resolved", "Resolved"

    ACTIVE = frozenset({Status.OPEN, Status.ACKNOWLEDGED})

    class ActionStatus(models.TextChoices):
        NONE = "none", "No action"
        PENDING = "pending", "Pending"
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    endpoint = models.ForeignKey("rollouts.Endpoint", on_delete=models.CASCADE, related_name="+")
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="+"
    )
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    observed = models.FloatField(help_text="the figure that crossed the threshold")
    threshold = models.FloatField(help_text="the limit it crossed, in the figure's unit")
    message = models.CharField(max_length=500)
    evidence = models.JSONField(default=dict)
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.OPEN, db_index=True
    )
    fired_at = models.DateTimeField(db_index=True)
    acknowledged_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.CharField(max_length=255, blank=True)
    action = models.CharField(max_length=20, choices=AlertAction.choices)
    action_status = models.CharField(
        max_length=16, choices=ActionStatus.choices, default=ActionStatus.NONE
    )
    action_result = models.TextField(blank=True)
    # A running action is claimed until ``action_lease_until``; a worker that dies leaves it
    # running past that, and beat (``monitoring.tasks.reclaim_alert_actions``) runs it again,
    # at most ``ALERT_ACTION_MAX_ATTEMPTS`` times in all.
    action_attempts = models.PositiveSmallIntegerField(default=0)
    action_lease_until = models.DateTimeField(null=True, blank=True)
    notified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-fired_at", "-pk"]
        constraints = [
            models.UniqueConstraint(
                fields=["rule"],
                condition=models.Q(status__in=["open", "acknowledged"]),
                name="one_active_alert_per_rule",
            )
        ]
        indexes = [models.Index(fields=["endpoint", "status"])]

    def __str__(self) -> str:
        return f"alert #{self.pk}: {self.message[:80]}"

    def get_absolute_url(self) -> str:
        from django.urls import reverse

        return reverse("monitoring:alert", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class RetrainingRequest(models.Model):
    """A request to retrain a model version, opened by an alert rule (``created_by`` None) or
    a person, with the evidence that prompted it."""

    class Status(models.TextChoices):
        OPEN = "open", "Open"
        CLOSED = "closed", "Closed"

    endpoint = models.ForeignKey(
        "rollouts.Endpoint", on_delete=models.CASCADE, related_name="retraining_requests"
    )
    model_version = models.ForeignKey(
        "registry.ModelVersion", on_delete=models.CASCADE, related_name="retraining_requests"
    )
    alert = models.ForeignKey(
        Alert, null=True, blank=True, on_delete=models.SET_NULL, related_name="retraining_requests"
    )
    reason = models.TextField()
    evidence = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.OPEN)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    closed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"retraining request #{self.pk} for {self.model_version_id}"


class PendingFeedback(models.Model):
    """A label sent for a request whose prediction row was not written yet (the serving log
    is buffered, so a client that labels right after its answer can be ahead of the log).

    Kept until the row is written (matched by the log writer's hook or the periodic
    ``monitoring.match_pending_feedback`` task, see
    :func:`monitoring.services.pending_feedback_match`) or until ``expires_at``. Exactly one of
    ``request_id`` and ``inference_id`` is set; ``endpoint_ids`` is the sender's scope (null:
    every endpoint), the same scope :func:`monitoring.services.feedback_record` applies.
    """

    request_id = models.UUIDField(null=True, blank=True, db_index=True)
    inference_id = models.CharField(max_length=128, blank=True, db_index=True)
    row = models.PositiveIntegerField(null=True, blank=True)
    label = models.JSONField()
    endpoint_ids = models.JSONField(null=True, blank=True)
    received_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=(
                    models.Q(request_id__isnull=False, inference_id="")
                    | models.Q(request_id__isnull=True) & ~models.Q(inference_id="")
                ),
                name="pending_feedback_one_ref",
            )
        ]

    def __str__(self) -> str:
        return f"pending label for {self.request_id or self.inference_id}"

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

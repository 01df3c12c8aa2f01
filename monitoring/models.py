"""Ground truth joined to the prediction log."""

from __future__ import annotations

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

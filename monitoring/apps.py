from __future__ import annotations

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    verbose_name = "Monitoring"

    def ready(self) -> None:
        # rollouts defines the interfaces, monitoring implements them: rollouts never imports
        # monitoring (tests/unit/test_architecture.py).
        from monitoring.canary import PredictionLogAnalysis
        from monitoring.rollups import mark_logged_rows
        from rollouts import analysis, hooks

        hooks.register_prediction_logged(mark_logged_rows)
        analysis.register(PredictionLogAnalysis())

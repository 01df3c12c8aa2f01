from __future__ import annotations

from django.apps import AppConfig


class MonitoringConfig(AppConfig):
    name = "monitoring"
    verbose_name = "Monitoring"

    def ready(self):
        from monitoring.canary import PredictionLogAnalysis
        from rollouts import analysis

        analysis.register(PredictionLogAnalysis())

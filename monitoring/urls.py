from __future__ import annotations

from django.urls import path

from monitoring import views

app_name = "monitoring"
urlpatterns = [
    path("endpoints/<slug:name>/", views.endpoint_dashboard, name="endpoint"),
    path("endpoints/<slug:name>/baseline", views.drift_baseline, name="drift_baseline"),
    path(
        "endpoints/<slug:name>/drift/<int:rollup_id>/<path:feature>.json",
        views.drift_histogram,
        name="drift_histogram",
    ),
]

# Alerts (monitoring.alert_views)
from monitoring import alert_views  # noqa: E402

urlpatterns += [
    path("alerts/", alert_views.alert_list, name="alerts"),
    path("alerts/<int:alert_id>/", alert_views.alert_detail, name="alert"),
    path(
        "alerts/<int:alert_id>/acknowledge",
        alert_views.alert_acknowledge,
        name="alert_acknowledge",
    ),
    path("alerts/rules/new", alert_views.rule_create, name="alert_rule_create"),
    path("alerts/rules/<int:rule_id>/", alert_views.rule_edit, name="alert_rule_edit"),
    path(
        "alerts/rules/<int:rule_id>/enabled",
        alert_views.rule_set_enabled,
        name="alert_rule_enabled",
    ),
]

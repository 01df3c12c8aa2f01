from __future__ import annotations

from django.urls import path

from monitoring import views

app_name = "monitoring"
urlpatterns = [
    path("endpoints/<slug:name>/", views.endpoint_dashboard, name="endpoint"),
    path(
        "endpoints/<slug:name>/drift/<int:rollup_id>/<path:feature>.json",
        views.drift_histogram,
        name="drift_histogram",
    ),
]

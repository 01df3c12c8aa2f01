from __future__ import annotations

from django.urls import path

from registry import views, webhooks

app_name = "registry"
urlpatterns = [
    path("", views.catalog, name="catalog"),
    path("sync", views.sync_now, name="sync"),
    # Before the "<str:name>/" routes, so that no model name can ever shadow it.
    path("webhooks/mlflow", webhooks.mlflow_webhook, name="webhook"),
    path("<str:name>/", views.model_detail, name="model"),
    path("<str:name>/versions/<int:version>/", views.version_detail, name="version"),
]

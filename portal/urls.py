from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from monitoring import views as monitoring_views
from portal import views
from rollouts.serving import views as serving_views

urlpatterns = [
    path("", monitoring_views.overview, name="home"),
    path("login/", auth_views.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("audit/", views.audit_trail, name="audit"),
    path("audit/export.csv", views.audit_export, name="audit_export"),
    path("registry/", include("registry.urls")),
    path("rollouts/", include("rollouts.urls")),
    path("monitoring/", include("monitoring.urls")),
    path("serving/", include("rollouts.serving.urls")),
    path("health", serving_views.health, name="health"),
    path("ping", serving_views.health, name="ping"),
    path("version", serving_views.version, name="version"),
    path("metrics", serving_views.metrics, name="metrics"),
    path("api/", include("portal.api_urls")),
]

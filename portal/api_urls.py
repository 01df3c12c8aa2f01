"""Every route under ``/api/``. Authentication: a session or ``Authorization: Token <token>``
(knox tokens of people, from ``POST /api/auth/token``); ``/api/feedback`` also takes a client's
serving API key."""

from __future__ import annotations

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView

from monitoring import api as monitoring_api
from portal import api, auth_api
from registry import api as registry_api

urlpatterns = [
    path("schema", SpectacularAPIView.as_view(), name="api-schema"),
    # API tokens of people
    path("auth/token", auth_api.TokenLoginApi.as_view(), name="api-auth-token"),
    path("auth/logout", auth_api.TokenLogoutApi.as_view(), name="api-auth-logout"),
    path("auth/logoutall", auth_api.TokenLogoutAllApi.as_view(), name="api-auth-logoutall"),
    # registry
    path("models", registry_api.ModelListApi.as_view(), name="api-models"),
    path("models/<str:name>", registry_api.ModelDetailApi.as_view(), name="api-model"),
    path(
        "models/<str:name>/versions/<int:version>",
        registry_api.ModelVersionDetailApi.as_view(),
        name="api-model-version",
    ),
    path(
        "models/<str:name>/compare",
        registry_api.ModelCompareApi.as_view(),
        name="api-model-compare",
    ),
    path("registry/sync", registry_api.RegistrySyncApi.as_view(), name="api-registry-sync"),
    # requests, environments, API keys, endpoints
    path("", include("rollouts.api_urls")),
    # monitoring
    path("feedback", monitoring_api.FeedbackApi.as_view(), name="api-feedback"),
    path(
        "endpoints/<slug:name>/metrics",
        monitoring_api.EndpointMetricsApi.as_view(),
        name="api-endpoint-metrics",
    ),
    # portal
    path("teams", api.TeamListApi.as_view(), name="api-teams"),
    path(
        "teams/<slug:slug>/members/<str:username>",
        api.TeamMemberApi.as_view(),
        name="api-team-member",
    ),
    path("audit", api.AuditListApi.as_view(), name="api-audit"),
    path("audit.csv", api.AuditCsvApi.as_view(), name="api-audit-csv"),
]

from __future__ import annotations

from django.urls import path

from rollouts import api

urlpatterns = [
    path("requests", api.DeploymentRequestListApi.as_view(), name="api-requests"),
    path("requests/<int:request_id>", api.DeploymentRequestDetailApi.as_view(), name="api-request"),
    path(
        "requests/<int:request_id>/approve",
        api.DeploymentRequestApproveApi.as_view(),
        name="api-request-approve",
    ),
    path(
        "requests/<int:request_id>/reject",
        api.DeploymentRequestRejectApi.as_view(),
        name="api-request-reject",
    ),
    path(
        "requests/<int:request_id>/cancel",
        api.DeploymentRequestCancelApi.as_view(),
        name="api-request-cancel",
    ),
    path(
        "requests/<int:request_id>/resubmit",
        api.DeploymentRequestResubmitApi.as_view(),
        name="api-request-resubmit",
    ),
    path(
        "requests/<int:request_id>/override-freeze",
        api.DeploymentRequestOverrideFreezeApi.as_view(),
        name="api-request-override-freeze",
    ),
    path(
        "requests/<int:request_id>/comments",
        api.DeploymentRequestCommentsApi.as_view(),
        name="api-request-comments",
    ),
    path("requests/<int:request_id>/rollout", api.RolloutApi.as_view(), name="api-rollout"),
    path(
        "requests/<int:request_id>/rollout/<str:action>",
        api.RolloutControlApi.as_view(),
        name="api-rollout-control",
    ),
    path("environments", api.EnvironmentListApi.as_view(), name="api-environments"),
    path("environments/<slug:name>", api.EnvironmentDetailApi.as_view(), name="api-environment"),
    path(
        "environments/<slug:name>/freeze-windows",
        api.FreezeWindowListApi.as_view(),
        name="api-environment-freeze-windows",
    ),
    path("api-keys", api.ApiKeyListApi.as_view(), name="api-api-keys"),
    path("api-keys/<int:key_id>/revoke", api.ApiKeyRevokeApi.as_view(), name="api-api-key-revoke"),
    path("endpoints", api.EndpointListApi.as_view(), name="api-endpoints"),
    path(
        "endpoints/<slug:name>/timeline",
        api.EndpointTimelineApi.as_view(),
        name="api-endpoint-timeline",
    ),
    path(
        "endpoints/<slug:name>/rollback",
        api.EndpointRollbackApi.as_view(),
        name="api-endpoint-rollback",
    ),
]

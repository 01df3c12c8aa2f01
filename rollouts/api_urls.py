from __future__ import annotations

from django.urls import path

from rollouts import api

urlpatterns = [
    path("requests", api.DeploymentRequestListApi.as_view(), name="api-requests"),
    path("requests/<int:request_id>", api.DeploymentRequestDetailApi.as_view(), name="api-request"),
    path("requests/<int:request_id>/approve", api.DeploymentRequestApproveApi.as_view(), name="api-request-approve"),
    path("requests/<int:request_id>/reject", api.DeploymentRequestRejectApi.as_view(), name="api-request-reject"),
    path("requests/<int:request_id>/cancel", api.DeploymentRequestCancelApi.as_view(), name="api-request-cancel"),
    path("endpoints", api.EndpointListApi.as_view(), name="api-endpoints"),
]

from __future__ import annotations

from django.urls import path

from rollouts import views

app_name = "rollouts"
urlpatterns = [
    path("requests/", views.request_list, name="requests"),
    path("requests/new/<str:name>/<int:version>/", views.request_create, name="request_create"),
    path("requests/<int:request_id>/", views.request_detail, name="request"),
    path("requests/<int:request_id>/approve", views.request_approve, name="request_approve"),
    path("requests/<int:request_id>/reject", views.request_reject, name="request_reject"),
    path("requests/<int:request_id>/cancel", views.request_cancel, name="request_cancel"),
    path("requests/<int:request_id>/comment", views.request_comment, name="request_comment"),
    path(
        "requests/<int:request_id>/override-freeze",
        views.request_override_freeze,
        name="request_override_freeze",
    ),
    path("requests/<int:request_id>/rollout", views.rollout_detail, name="rollout"),
    path(
        "requests/<int:request_id>/rollout/<str:action>",
        views.rollout_control,
        name="rollout_control",
    ),
    path("endpoints/", views.endpoint_list, name="endpoints"),
    path("api-keys/", views.api_key_list, name="api_keys"),
    path("api-keys/<int:key_id>/revoke", views.api_key_revoke, name="api_key_revoke"),
    path("endpoints/<slug:name>/timeline", views.endpoint_timeline, name="endpoint_timeline"),
    path("endpoints/<slug:name>/rollback", views.endpoint_rollback, name="endpoint_rollback"),
]

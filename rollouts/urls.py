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
    path("endpoints/", views.endpoint_list, name="endpoints"),
]

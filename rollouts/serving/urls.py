from __future__ import annotations

from django.urls import path

from rollouts.serving import views

app_name = "serving"
urlpatterns = [
    path("<slug:endpoint>/invocations", views.invocations, name="invocations"),
    path("<slug:endpoint>/ping", views.ping, name="ping"),
]

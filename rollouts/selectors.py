"""Reads of the rollouts app, including the one place that decides who sees which request."""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Prefetch, QuerySet

from portal.roles import can_review, user_roles
from rollouts.models import Deployment, DeploymentRequest, Endpoint, Review


def deployment_requests_visible_to(user: User | AnonymousUser) -> QuerySet[DeploymentRequest]:
    """Every request a user may see: none for anonymous users, all for every persona
    (team scoping arrives with teams)."""
    qs = DeploymentRequest.objects.select_related(
        "model_version__registered_model", "endpoint__environment", "requester"
    )
    if not user.is_authenticated or not user_roles(user):
        return qs.none()
    return qs


def deployment_request_detail(user: User | AnonymousUser, request_id: int) -> DeploymentRequest:
    """Raises DeploymentRequest.DoesNotExist when missing or not visible to ``user``."""
    return (
        deployment_requests_visible_to(user)
        .prefetch_related(Prefetch("reviews", queryset=Review.objects.select_related("reviewer")))
        .get(pk=request_id)
    )


def review_queue(user: User | AnonymousUser) -> QuerySet[DeploymentRequest]:
    """Requests awaiting a decision that ``user`` may make (never their own)."""
    if not can_review(user):
        return DeploymentRequest.objects.none()
    return deployment_requests_visible_to(user).filter(
        status=DeploymentRequest.Status.AWAITING_REVIEW
    ).exclude(requester=user)


def endpoints_with_live_versions() -> list[tuple[Endpoint, list[Deployment]]]:
    endpoints = Endpoint.objects.select_related("environment", "registered_model").prefetch_related(
        Prefetch(
            "deployments",
            queryset=Deployment.objects.filter(status=Deployment.Status.LIVE).select_related(
                "model_version"
            ),
            to_attr="live_deployments",
        )
    )
    return [(e, e.live_deployments) for e in endpoints]

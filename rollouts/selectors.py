"""Reads of the rollouts app, including the one place that decides who sees which request."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Case, F, IntegerField, Prefetch, Q, QuerySet, Value, When

from portal.roles import REVIEWERS, can_review
from registry.selectors import registered_models_visible_to
from rollouts.models import (
    Comment,
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    Review,
    TrafficHistory,
)


def deployment_requests_visible_to(user: User | AnonymousUser) -> QuerySet[DeploymentRequest]:
    """The one place that scopes requests: the requests on registered models the user may see
    (``registry.selectors.registered_models_visible_to``)."""
    return DeploymentRequest.objects.select_related(
        "model_version__registered_model", "endpoint__environment", "requester"
    ).filter(model_version__registered_model__in=registered_models_visible_to(user))


def endpoints_visible_to(user: User | AnonymousUser) -> QuerySet[Endpoint]:
    """Endpoints of the registered models the user may see."""
    return Endpoint.objects.select_related("environment", "registered_model").filter(
        registered_model__in=registered_models_visible_to(user)
    )


def deployment_request_detail(user: User | AnonymousUser, request_id: int) -> DeploymentRequest:
    """Raises DeploymentRequest.DoesNotExist when missing or not visible to ``user``."""
    return (
        deployment_requests_visible_to(user)
        .select_related("previous_request", "freeze_override_by")
        .prefetch_related(
            Prefetch("reviews", queryset=Review.objects.select_related("reviewer")),
            Prefetch("comments", queryset=Comment.objects.select_related("author")),
            "gate_results",
            "resubmissions",
        )
        .get(pk=request_id)
    )


def review_queue(user: User | AnonymousUser) -> QuerySet[DeploymentRequest]:
    """Requests awaiting a decision that ``user`` may make: in an environment whose approver
    group they belong to, never their own, not yet reviewed by them."""
    if not user.is_authenticated:
        return DeploymentRequest.objects.none()
    groups = list(user.groups.values_list("pk", flat=True))
    in_group = Q(endpoint__environment__approver_group__in=groups)
    if can_review(user):
        in_group |= Q(endpoint__environment__approver_group__isnull=True)
    return (
        deployment_requests_visible_to(user)
        .filter(in_group, status=DeploymentRequest.Status.AWAITING_REVIEW)
        .exclude(requester=user)
        .exclude(reviews__reviewer=user)
    )


# --- Roles: what is stable, what is canary --------------------------------------------------

_ROLE_ORDER = Case(
    *(When(role=role, then=Value(i)) for i, role in enumerate(Deployment.Role.values)),
    default=Value(len(Deployment.Role.values)),
    output_field=IntegerField(),
)


def live_deployments_by_role(endpoint_ids: Iterable[int]) -> dict[int, list[Deployment]]:
    """The live deployments of each endpoint id, stable first, then canary, shadow, variant
    (within a role: the one live first). Endpoints with nothing live are absent. One query;
    each deployment comes with its ``model_version`` (only its id and number loaded).

    The one answer to "what is stable": ``Deployment.role``, a row that a database constraint
    keeps to at most one live stable per endpoint, never the largest traffic weight."""
    rows = (
        Deployment.objects.filter(endpoint_id__in=list(endpoint_ids), status=Deployment.Status.LIVE)
        .select_related("model_version")
        .only(
            "pk",
            "endpoint_id",
            "role",
            "status",
            "traffic_weight",
            "live_at",
            "model_version__id",
            "model_version__version",
        )
        .order_by("endpoint_id", _ROLE_ORDER, F("live_at").asc(nulls_last=True), "pk")
    )
    out: dict[int, list[Deployment]] = {}
    for d in rows:
        out.setdefault(d.endpoint_id, []).append(d)
    return out


class EndpointRoles(NamedTuple):
    stable: Deployment | None
    canary: Deployment | None


def endpoint_roles(endpoint: Endpoint | int) -> EndpointRoles:
    """``(stable, canary)``: the endpoint's live stable and live canary deployments (each with
    its ``model_version`` loaded), None where there is none. One query."""
    endpoint_id = endpoint if isinstance(endpoint, int) else endpoint.pk
    live = (
        Deployment.objects.filter(
            endpoint_id=endpoint_id,
            status=Deployment.Status.LIVE,
            role__in=[Deployment.Role.STABLE, Deployment.Role.CANARY],
        )
        .select_related("model_version__registered_model")
        .order_by(F("live_at").asc(nulls_last=True), "pk")
    )
    by_role = {}
    for d in live:
        by_role.setdefault(d.role, d)
    return EndpointRoles(by_role.get(Deployment.Role.STABLE), by_role.get(Deployment.Role.CANARY))


def stable_of(endpoint: Endpoint | int) -> Deployment | None:
    """The endpoint's live stable deployment, or None when nothing is live there."""
    return endpoint_roles(endpoint).stable


def endpoints_with_live_versions(
    user: User | AnonymousUser,
) -> list[tuple[Endpoint, list[Deployment]]]:
    endpoints = endpoints_visible_to(user).prefetch_related(
        Prefetch(
            "deployments",
            queryset=Deployment.objects.filter(status=Deployment.Status.LIVE).select_related(
                "model_version"
            ),
            to_attr="live_deployments",
        )
    )
    return [(e, e.live_deployments) for e in endpoints]


def live_deployments_of_deleted_versions(endpoint: Endpoint) -> list[Deployment]:
    """Live deployments on ``endpoint`` whose model version was deleted in MLflow since
    (``ModelVersion.deleted_at``, set by the registry sync). They keep serving from the copy
    each serving process loaded until a person acts; the endpoint pages say so."""
    return list(
        endpoint.deployments.filter(
            status=Deployment.Status.LIVE, model_version__deleted_at__isnull=False
        )
        .select_related("model_version")
        .order_by("model_version__version")
    )


def traffic_timeline(endpoint: Endpoint) -> list[dict[str, object]]:
    """What served when: one row per traffic state of the endpoint, oldest first, from its
    :class:`~rollouts.models.TrafficHistory` (written by ``services.traffic_set``; backfilled
    from the audit trail for older changes): ``{"start": datetime, "end": datetime | None,
    "traffic": {"v1": 100}, "actor": str}``; ``end`` None for the current state. One query."""
    states = list(
        TrafficHistory.objects.filter(endpoint=endpoint)
        .order_by("pk")
        .values_list("created_at", "split", "actor_label")
    )
    rows = []
    for i, (start, split, actor) in enumerate(states):
        end = states[i + 1][0] if i + 1 < len(states) else None
        rows.append({"start": start, "end": end, "traffic": split, "actor": actor})
    return rows


def eligible_approvers(
    environment: Environment, *, requester: User | None = None
) -> QuerySet[User]:
    """The active members of the environment's approver group (the reviewers group when it has
    none), less ``requester``: who could approve one of its requests."""
    name = environment.approver_group.name if environment.approver_group_id else REVIEWERS
    users = User.objects.filter(groups__name=name, is_active=True).distinct()
    return users.exclude(pk=requester.pk) if requester is not None else users


def approval_policy_problem(
    environment: Environment,
    *,
    requester: User | None = None,
    approved_by: set[int] | frozenset[int] = frozenset(),
) -> str:
    """Why the environment's approval policy cannot be met, or ``""`` when it can.

    Counts the distinct people who could give the ``required_approvals``: the active members
    of the approver group, less ``requester`` (who never approves their own request), plus
    those who already approved it (``approved_by``, user ids: their approval stands even if they
    left the group). Without ``requester`` it judges the policy itself (refused on save); with
    one, a request (warned about on its page when membership shrank after it was opened).
    """
    name = environment.approver_group.name if environment.approver_group_id else REVIEWERS
    required = environment.required_approvals
    people = set(eligible_approvers(environment, requester=requester).values_list("pk", flat=True))
    count = len(people | set(approved_by))
    needs = f"{environment.name} needs {required} distinct approval{'s' if required != 1 else ''}"
    if requester is not None:
        if count >= required:
            return ""
        return (
            f"{needs} from {name!r}, but only {count} "
            f"{'person' if count == 1 else 'people'} other than the requester can approve: this "
            "request cannot be approved until a platform admin adds approvers or lowers the "
            "requirement."
        )
    if count == 0:
        return (
            f"The approver group {name!r} has no active members, so no {environment.name} "
            "request could ever be approved."
        )
    if count < required:
        return (
            f"{needs} but {name!r} has only {count} active member{'s' if count != 1 else ''}, "
            "so no request could ever be approved."
        )
    return ""


def restorable_versions(endpoint: Endpoint) -> list[int]:
    """Versions a person can roll the endpoint back to without a request: live on it before and
    replaced since (their request superseded), newest first, the one serving now excluded."""
    stable = stable_of(endpoint)
    rows = (
        Deployment.objects.filter(
            endpoint=endpoint,
            status=Deployment.Status.RETIRED,
            request__status=DeploymentRequest.Status.SUPERSEDED,
        )
        .exclude(model_version_id=getattr(stable, "model_version_id", None))
        .order_by("-model_version__version")
        .values_list("model_version__version", flat=True)
    )
    return list(dict.fromkeys(rows))

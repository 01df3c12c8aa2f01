"""Personas and the one place where a user's role is decided.

Roles are Django groups, so platform admins manage membership in the admin. A superuser counts
as a platform admin but never gains the reviewer role by being staff: separation of duties is
decided by group membership and by who requested what, not by ``is_staff``.
"""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser, Group, User
from django.http import HttpRequest

DATA_SCIENTISTS = "data scientists"
REVIEWERS = "reviewers"
MANAGERS = "managers"
PLATFORM_ADMINS = "platform admins"
ALL_ROLES = (DATA_SCIENTISTS, REVIEWERS, MANAGERS, PLATFORM_ADMINS)


def user_roles(user: User | AnonymousUser) -> frozenset[str]:
    """The role names (group names from ``ALL_ROLES``) a user holds; cached on the user."""
    if not user.is_authenticated:
        return frozenset()
    cached = getattr(user, "_rollgate_roles", None)
    if cached is None:
        names = set(user.groups.filter(name__in=ALL_ROLES).values_list("name", flat=True))
        if user.is_superuser:
            names.add(PLATFORM_ADMINS)
        cached = frozenset(names)
        user._rollgate_roles = cached  # type: ignore[union-attr]
    return cached


def has_role(user: User | AnonymousUser, role: str) -> bool:
    return role in user_roles(user)


def can_request_deployment(user: User | AnonymousUser) -> bool:
    return has_role(user, DATA_SCIENTISTS)


def can_review(user: User | AnonymousUser) -> bool:
    return has_role(user, REVIEWERS)


def sees_all_teams(user: User | AnonymousUser) -> bool:
    """Reviewers, managers and platform admins see every team's models and requests."""
    return bool(user_roles(user) & {REVIEWERS, MANAGERS, PLATFORM_ADMINS})


def is_platform_admin(user: User | AnonymousUser) -> bool:
    return has_role(user, PLATFORM_ADMINS)


def can_sync_registry(user: User | AnonymousUser) -> bool:
    roles = user_roles(user)
    return bool(roles & {DATA_SCIENTISTS, REVIEWERS, PLATFORM_ADMINS})


def ensure_role_groups() -> dict[str, Group]:
    """Create the persona groups if missing; returns them by name."""
    return {name: Group.objects.get_or_create(name=name)[0] for name in ALL_ROLES}


def roles_context(request: HttpRequest) -> dict[str, object]:
    """Template context processor: ``roles`` and per-action flags for the navigation."""
    user = getattr(request, "user", AnonymousUser())
    roles = user_roles(user)
    return {
        "roles": sorted(roles),
        "is_data_scientist": DATA_SCIENTISTS in roles,
        "is_reviewer": REVIEWERS in roles,
        "is_manager": MANAGERS in roles,
        "is_platform_admin": PLATFORM_ADMINS in roles,
    }

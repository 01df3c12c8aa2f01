"""Writes of the portal app: teams and their members, each change audited."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.db import transaction

from portal.audit import audit_record
from portal.models import Team
from portal.roles import is_platform_admin


def _check_admin(actor: User) -> None:
    if not is_platform_admin(actor):
        raise PermissionDenied("Only platform admins can manage teams.")


@transaction.atomic
def team_create(*, actor: User, name: str, slug: str) -> Team:
    """Create a team (``slug`` matches the MLflow tag ``team`` of the models it owns).

    Raises: PermissionDenied (not a platform admin), ValidationError (blank, or the name or
    slug is taken).
    """
    _check_admin(actor)
    team = Team(name=name.strip(), slug=slug.strip())
    team.full_clean()
    team.save()
    audit_record(
        actor=actor, action="team.created", obj=team, after={"name": team.name, "slug": team.slug}
    )
    return team


@transaction.atomic
def team_add_member(*, actor: User, team: Team, user: User) -> Team:
    """Add ``user`` to ``team``; a no-op, without an audit event, when already a member.

    Raises: PermissionDenied (not a platform admin).
    """
    _check_admin(actor)
    team = Team.objects.select_for_update().get(pk=team.pk)
    if not team.members.filter(pk=user.pk).exists():
        team.members.add(user)
        audit_record(
            actor=actor, action="team.member_added", obj=team, after={"member": user.username}
        )
    return team


@transaction.atomic
def team_remove_member(*, actor: User, team: Team, user: User) -> Team:
    """Remove ``user`` from ``team``; a no-op, without an audit event, when not a member.

    Raises: PermissionDenied (not a platform admin).
    """
    _check_admin(actor)
    team = Team.objects.select_for_update().get(pk=team.pk)
    if team.members.filter(pk=user.pk).exists():
        team.members.remove(user)
        audit_record(
            actor=actor, action="team.member_removed", obj=team, before={"member": user.username}
        )
    return team

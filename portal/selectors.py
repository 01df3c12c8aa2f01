"""Reads of the portal app: the audit trail, scoped and filtered in one place."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, time, timedelta

from django.contrib.auth.models import AnonymousUser, User
from django.db.models import Q, QuerySet
from django.utils import timezone
from django.utils.dateparse import parse_date

from portal.models import AuditEvent, Team
from portal.roles import is_platform_admin, sees_all_teams, user_roles


def audit_events_visible_to(user: User | AnonymousUser) -> QuerySet[AuditEvent]:
    """Everything for reviewers, managers and platform admins; for a data scientist, the events
    about their teams' models and their own actions; nothing for users without a role."""
    events = AuditEvent.objects.select_related("actor")
    if sees_all_teams(user):
        return events
    if not user_roles(user):
        return events.none()
    names = user.teams.values_list("registered_models__name", flat=True)
    return events.filter(Q(registered_model__in=names) | Q(actor=user))


@dataclass(frozen=True)
class AuditFilters:
    model: str = ""
    environment: str = ""
    actor: str = ""
    action: str = ""
    since: str = ""  # YYYY-MM-DD, inclusive
    until: str = ""  # YYYY-MM-DD, inclusive

    @classmethod
    def from_query(cls, query) -> AuditFilters:
        """The filters of a query dict, validated by :class:`portal.queries.AuditFilterQuery`
        (dates from 1970-01-01 to 9998-12-31, bounded lengths). Raises BadFilter."""
        from portal.queries import AuditFilterQuery, BadQuery, validated_query

        fields = {f: query.get(f) or "" for f in cls.__dataclass_fields__}
        try:
            data = validated_query(AuditFilterQuery, fields)
        except BadQuery as exc:
            raise BadFilter(str(exc)) from None
        return cls(**{f: str(data.get(f, "")) for f in cls.__dataclass_fields__})


class BadFilter(ValueError):
    """A filter value that cannot be read (HTTP 400)."""


def _day_start(text: str, field: str) -> datetime:
    try:
        day = parse_date(text)
    except ValueError:  # well formed but no such day, e.g. 2025-02-30
        day = None
    if day is None:
        raise BadFilter(f"{field} must be a date written YYYY-MM-DD")
    return timezone.make_aware(datetime.combine(day, time.min), timezone.get_current_timezone())


def audit_events_filtered(
    user: User | AnonymousUser, filters: AuditFilters
) -> QuerySet[AuditEvent]:
    """Raises BadFilter for an unreadable date."""
    events = audit_events_visible_to(user)
    if filters.model:
        events = events.filter(registered_model=filters.model)
    if filters.environment:
        events = events.filter(environment=filters.environment)
    if filters.actor:
        events = events.filter(actor_label=filters.actor)
    if filters.action:
        events = events.filter(action=filters.action)
    if filters.since:
        events = events.filter(created_at__gte=_day_start(filters.since, "since"))
    if filters.until:
        until = _day_start(filters.until, "until") + timedelta(days=1)
        events = events.filter(created_at__lt=until)
    return events.order_by("-id")


def teams_visible_to(user: User | AnonymousUser) -> QuerySet[Team]:
    """Every team for platform admins; the user's own teams for everyone else."""
    if is_platform_admin(user):
        return Team.objects.all()
    if not user.is_authenticated:
        return Team.objects.none()
    return Team.objects.filter(members=user)

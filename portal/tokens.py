"""API tokens of people (django-rest-knox): created, revoked and listed here, each write audited.

A token is shown once, when created; the database keeps only its SHA-512 digest and its first
15 characters (``token_key``, which names it in the audit trail and the admin). Tokens expire
after ``API_TOKEN_TTL_HOURS``; an expired token is refused and deleted by knox on its next use.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from knox.models import AuthToken


def _target(token: AuthToken) -> tuple[str, str, str]:
    return ("knox.AuthToken", token.token_key, f"API token {token.token_key}… of {token.user}")


@transaction.atomic
def api_token_create(
    *, user: User, actor: User | None, ttl_hours: float | None = None
) -> tuple[AuthToken, str]:
    """A new token for ``user``: (row, the raw token to show once).

    ``ttl_hours`` defaults to ``API_TOKEN_TTL_HOURS``; 0 or less means no expiry. ``actor`` is
    who asked (the user at login, None for the ``api_token`` command, recorded as system).
    """
    from portal.audit import audit_record

    hours = settings.API_TOKEN_TTL_HOURS if ttl_hours is None else ttl_hours
    expiry = timedelta(hours=hours) if hours > 0 else None
    token, raw = AuthToken.objects.create(user=user, expiry=expiry)
    audit_record(
        actor=actor,
        action="api_token.created",
        target=_target(token),
        after={"user": user.username, "expiry": token.expiry},
    )
    return token, raw


@transaction.atomic
def api_token_revoke(*, token: AuthToken, actor: User | None) -> None:
    """Revoke (delete) one token; it is refused from the next request on."""
    from portal.audit import audit_record

    audit_record(
        actor=actor,
        action="api_token.revoked",
        target=_target(token),
        before={"user": token.user.username, "expiry": token.expiry},
    )
    token.delete()


@transaction.atomic
def api_token_revoke_all(*, user: User, actor: User | None) -> int:
    """Revoke every token of ``user``; returns how many there were (no event when none)."""
    from portal.audit import audit_record

    count, _ = AuthToken.objects.filter(user=user).delete()
    if count:
        audit_record(
            actor=actor,
            action="api_token.revoked_all",
            target=("auth.User", str(user.pk), user.username),
            before={"tokens": count},
        )
    return count

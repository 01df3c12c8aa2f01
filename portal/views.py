from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from portal.models import AuditEvent
from portal.roles import user_roles


@login_required
def audit_trail(request: HttpRequest) -> HttpResponse:
    """Every recorded action, newest first; filter by action and actor.

    Only for users who hold a Rollgate role: the events carry the requests, comments and keys
    that ``rollouts.selectors`` hides from everyone else.
    """
    if not user_roles(request.user):
        raise PermissionDenied("The audit trail is open to Rollgate personas only.")
    events = AuditEvent.objects.select_related("actor")
    action = request.GET.get("action", "").strip()
    actor = request.GET.get("actor", "").strip()
    if action:
        events = events.filter(action=action)
    if actor:
        events = events.filter(actor_label=actor)
    page = Paginator(events, 50).get_page(request.GET.get("page"))
    return render(
        request,
        "portal/audit.html",
        {
            "page": page,
            "action": action,
            "actor": actor,
            "actions": AuditEvent.objects.order_by("action").values_list("action", flat=True).distinct(),
        },
    )

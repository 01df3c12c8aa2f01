from __future__ import annotations

import csv
import json

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse, HttpResponseBadRequest, StreamingHttpResponse
from django.shortcuts import render

from portal.roles import user_roles
from portal.selectors import AuditFilters, BadFilter, audit_events_filtered, audit_events_visible_to


def bad_request_page(
    request: HttpRequest,
    message: str,
    *,
    allowed: str = "",
    title: str = "Bad request",
    back_url: str = "",
) -> HttpResponse:
    """A 400 inside the site's layout (``templates/400.html``): ``message`` says what was
    wrong, ``allowed`` the accepted values or range; ``back_url`` defaults to the page itself
    without its query."""
    context = {"message": message, "allowed": allowed, "title": title, "back_url": back_url}
    return render(request, "400.html", context, status=400)


def _events(request: HttpRequest):
    if not user_roles(request.user):
        raise PermissionDenied("The audit trail is open to Rollgate personas only.")
    filters = AuditFilters.from_query(request.GET)
    return filters, audit_events_filtered(request.user, filters)


@login_required
def audit_trail(request: HttpRequest) -> HttpResponse:
    """Every recorded action the user may see, newest first; filter by model, environment,
    actor, action and date range; export the same selection as CSV."""
    try:
        filters, events = _events(request)
        page = Paginator(events, 50).get_page(request.GET.get("page"))
    except BadFilter as exc:
        return bad_request_page(request, str(exc), title="Bad audit filter", back_url="/audit/")
    visible = audit_events_visible_to(request.user)
    query = request.GET.copy()
    query.pop("page", None)
    return render(
        request,
        "portal/audit.html",
        {
            "page": page,
            "filters": filters,
            "query": query.urlencode(),
            "actions": visible.order_by("action").values_list("action", flat=True).distinct(),
            "models": visible.exclude(registered_model="")
            .order_by("registered_model")
            .values_list("registered_model", flat=True)
            .distinct(),
            "environments": visible.exclude(environment="")
            .order_by("environment")
            .values_list("environment", flat=True)
            .distinct(),
        },
    )


class _Echo:
    def write(self, value: str) -> str:
        return value


@login_required
def audit_export(request: HttpRequest) -> HttpResponse:
    """The filtered audit trail as CSV, streamed (one row per event, oldest first)."""
    try:
        _, events = _events(request)
        events = events.order_by("id")
        events.exists()  # evaluate the filters now, so a bad date is a 400, not a broken stream
    except BadFilter as exc:
        return HttpResponseBadRequest(str(exc))
    writer = csv.writer(_Echo())
    header = [
        "id",
        "created_at",
        "actor",
        "action",
        "object_type",
        "object_id",
        "object",
        "registered_model",
        "environment",
        "before",
        "after",
        "prev_hash",
        "hash",
    ]

    def rows():
        yield writer.writerow(header)
        for e in events.iterator(chunk_size=2000):
            yield writer.writerow(
                [
                    e.pk,
                    e.created_at.isoformat(),
                    e.actor_label,
                    e.action,
                    e.object_type,
                    e.object_id,
                    e.object_repr,
                    e.registered_model,
                    e.environment,
                    json.dumps(e.before),
                    json.dumps(e.after),
                    e.prev_hash,
                    e.hash,
                ]
            )

    response = StreamingHttpResponse(rows(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = 'attachment; filename="rollgate-audit.csv"'
    return response

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, render

from monitoring import figures, selectors
from portal.selectors import audit_events_visible_to
from rollouts import selectors as rollout_selectors


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    """Home: what serves where, what awaits review, and the latest audit events."""
    return render(
        request,
        "monitoring/overview.html",
        {
            "endpoints": rollout_selectors.endpoints_with_live_versions(request.user),
            "queue": rollout_selectors.review_queue(request.user)[:20],
            "my_requests": rollout_selectors.deployment_requests_visible_to(request.user).filter(
                requester=request.user
            )[:10],
            # The audit trail is for personas only (see portal.views.audit_trail).
            "recent_events": audit_events_visible_to(request.user)[:10],
        },
    )


@login_required
def endpoint_dashboard(request: HttpRequest, name: str) -> HttpResponse:
    endpoint = get_object_or_404(rollout_selectors.endpoints_visible_to(request.user), name=name)
    frame = selectors.prediction_frame(endpoint)
    window = selectors.pick_window(frame, request.GET.get("window"))
    return render(
        request,
        "monitoring/endpoint.html",
        {
            "endpoint": endpoint,
            "stats": selectors.version_stats(endpoint, frame),
            "figures": figures.endpoint_figures(selectors.time_series(frame, window)),
            "window": window,
            "windows": list(selectors.WINDOWS),
        },
    )

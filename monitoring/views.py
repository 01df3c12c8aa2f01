from __future__ import annotations

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest, JsonResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from monitoring import figures, selectors, services
from monitoring.models import DriftBaseline
from monitoring.queries import RANGE_TEXT
from portal.selectors import audit_events_visible_to
from portal.views import bad_request_page
from registry.models import ModelVersion
from rollouts import selectors as rollout_selectors
from rollouts.models import TrafficHistory

#: Drift windows listed in the per-window summary table, newest first.
DRIFT_SUMMARY_ROWS = 24


@login_required
def overview(request: HttpRequest) -> HttpResponse:
    """Home: every visible endpoint with its live versions, health, drift, open alerts and
    pending approvals; the delivery figures of the last 90 days; what awaits review; the
    latest audit events. Reads rollups only, in a fixed number of queries."""
    queue = list(rollout_selectors.review_queue(request.user)[:20])
    return render(
        request,
        "monitoring/overview.html",
        {
            "summaries": selectors.overview_endpoints(request.user),
            "delivery": selectors.delivery_figures(request.user),
            "queue": queue,
            "my_requests": rollout_selectors.deployment_requests_visible_to(request.user).filter(
                requester=request.user
            )[:10],
            # The audit trail is for personas only (see portal.views.audit_trail).
            "recent_events": audit_events_visible_to(request.user)[:10],
        },
    )


def _visible_endpoint(request: HttpRequest, name: str):
    return get_object_or_404(rollout_selectors.endpoints_visible_to(request.user), name=name)


def _histogram_url(endpoint_name: str, rollup_id: int, feature: str) -> str:
    return reverse("monitoring:drift_histogram", args=[endpoint_name, rollup_id, feature])


@login_required
def endpoint_dashboard(request: HttpRequest, name: str) -> HttpResponse:
    """Per version figures, charts and drift of one endpoint over ``?window=hour|day`` windows
    and ``?days=N``; ``?feature=<name>`` opens that feature's histograms (the latest window
    it drifted in). A bad window or range is a 400 that says what is allowed."""
    endpoint = _visible_endpoint(request, name)
    try:
        rng = selectors.range_from_query(endpoint, request.GET)
    except selectors.BadQuery as exc:
        return bad_request_page(
            request,
            str(exc),
            title=f"{endpoint.name}: bad range",
            allowed=RANGE_TEXT,
            back_url=reverse("monitoring:endpoint", args=[endpoint.name]),
        )
    live = selectors.live_versions([endpoint.pk]).get(endpoint.pk, [])
    result = selectors.endpoint_figures(endpoint, rng, live)
    windows = selectors.drift_windows(endpoint, rng)
    roles = {v.version: v.role for v in result.versions}
    feature = request.GET.get("feature", "")
    initial, feature_missing = None, False
    if feature:
        chosen = selectors.drift_window_for_feature(windows, feature)
        if chosen is None:
            feature_missing = True
        else:
            initial = {"feature": feature, "url": _histogram_url(endpoint.name, chosen.id, feature)}
    return render(
        request,
        "monitoring/endpoint.html",
        {
            "endpoint": endpoint,
            "deleted_live": rollout_selectors.live_deployments_of_deleted_versions(endpoint),
            "range": rng,
            "windows": selectors.WINDOWS,
            "versions": result.versions,
            "has_classifier": any(not v.is_regression for v in result.versions),
            "has_regressor": any(v.is_regression for v in result.versions),
            "figures": figures.endpoint_figures(
                result.versions,
                result.series,
                (rng.start, rng.end),
                changes=TrafficHistory.objects.filter(
                    endpoint=endpoint, created_at__gte=rng.start, created_at__lte=rng.end
                )
                .order_by("created_at")
                .values_list("created_at", "split"),
            ),
            "drift_heatmaps": figures.drift_heatmaps(windows, roles),
            "drift_summary": list(reversed(windows))[:DRIFT_SUMMARY_ROWS],
            "drift_initial": initial,
            "feature": feature,
            "feature_missing": feature_missing,
            "histogram_url": _histogram_url(endpoint.name, 0, "__feature__"),
            "baselines": DriftBaseline.objects.filter(endpoint=endpoint).select_related(
                "model_version", "chosen_by"
            ),
            "may_choose_baseline": services.may_choose_baseline(request.user, endpoint),
        },
    )


class BaselineForm(forms.Form):
    version = forms.IntegerField(min_value=1)
    start = forms.DateTimeField(required=False)
    end = forms.DateTimeField(required=False)
    clear = forms.BooleanField(required=False)

    def clean(self):
        data = super().clean()
        if not data.get("clear") and not (data.get("start") and data.get("end")):
            raise forms.ValidationError("Give the baseline window's start and end.")
        return data


@login_required
@require_POST
def drift_baseline(request: HttpRequest, name: str) -> HttpResponse:
    """``POST /monitoring/endpoints/<name>/baseline``: make a window of a version's traffic its
    drift reference (``version``, ``start``, ``end``; UTC) or go back to its training sample
    (``clear``). 404 for an endpoint or version not visible here, 403 for a user who may not
    choose, 400 with the reason for a bad window; else back to the dashboard."""
    endpoint = _visible_endpoint(request, name)
    if not services.may_choose_baseline(request.user, endpoint):
        return HttpResponse(
            "Only data scientists of the model's team and platform admins choose drift baselines.",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    form = BaselineForm(request.POST)
    if not form.is_valid():
        return HttpResponseBadRequest(
            "; ".join(f"{k}: {' '.join(v)}" for k, v in form.errors.items()),
            content_type="text/plain; charset=utf-8",
        )
    version = get_object_or_404(
        ModelVersion,
        registered_model=endpoint.registered_model,
        version=form.cleaned_data["version"],
    )
    data = form.cleaned_data
    try:
        if data["clear"]:
            services.drift_baseline_clear(
                actor=request.user, endpoint=endpoint, model_version=version
            )
            messages.success(
                request, f"v{version.version} is compared with its training sample again."
            )
        else:
            services.drift_baseline_set(
                actor=request.user,
                endpoint=endpoint,
                model_version=version,
                start=data["start"],
                end=data["end"],
            )
            messages.success(
                request,
                f"v{version.version} is compared with its traffic of {data['start']:%Y-%m-%d %H:%M} "
                f"to {data['end']:%Y-%m-%d %H:%M}; drift is recomputed within a minute.",
            )
    except PermissionDenied as exc:
        return HttpResponse(str(exc), status=403, content_type="text/plain; charset=utf-8")
    except ValidationError as exc:
        return HttpResponseBadRequest(
            " ".join(exc.messages), content_type="text/plain; charset=utf-8"
        )
    return redirect(reverse("monitoring:endpoint", args=[endpoint.name]) + "?window=day")


@login_required
def drift_histogram(request: HttpRequest, name: str, rollup_id: int, feature: str) -> JsonResponse:
    """``GET /monitoring/endpoints/<name>/drift/<rollup_id>/<feature>.json``: the reference and
    current histograms of one feature in one drift window, as a plotly figure, with the
    feature's drift figures. 404 unless the endpoint is visible, the rollup is its own and the
    feature has a histogram."""
    endpoint = _visible_endpoint(request, name)
    detail = selectors.drift_histogram(endpoint, rollup_id, feature)
    if detail is None:
        raise Http404("No histogram of this feature in this window.")
    drift = detail["drift"] or {}
    parts = [f"v{detail['version']}", str(drift.get("status", "no result"))]
    for key, label in (("psi", "PSI"), ("jensen_shannon", "Jensen-Shannon"), ("ks", "KS")):
        if isinstance(drift.get(key), int | float):
            parts.append(f"{label} {drift[key]:.3g}")
    if drift.get("reason"):
        parts.append(str(drift["reason"]))
    parts.append(f"reference: {detail['reference_source']}")
    body = figures.strict(
        {
            "feature": detail["feature"],
            "version": detail["version"],
            "window": detail["window"],
            "window_start": detail["window_start"],
            "drift": drift,
            "summary": " · ".join(parts),
            "figure": figures.drift_histogram_figure(detail),
        }
    )
    return JsonResponse(body, json_dumps_params={"allow_nan": False})

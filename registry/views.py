from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from portal.models import Team
from portal.queries import BadQuery, validated_query
from portal.roles import can_sync_registry
from portal.tasking import enqueue_on_commit
from portal.views import bad_request_page
from registry import compare as compare_versions
from registry import selectors, tasks
from registry.models import ModelVersion
from registry.queries import CatalogQuery, VersionPairQuery


@login_required
def catalog(request: HttpRequest) -> HttpResponse:
    try:
        query = validated_query(CatalogQuery, request.GET)
    except BadQuery as exc:
        return bad_request_page(request, str(exc), back_url=reverse("registry:catalog"))
    search, team = query.get("q", ""), query.get("team", "")
    return render(
        request,
        "registry/catalog.html",
        {
            "models": selectors.registered_models_list(request.user, search=search, team=team),
            "q": search,
            "team": team,
            "teams": Team.objects.order_by("name"),
            "sync_problems": selectors.registered_models_with_sync_errors(request.user),
        },
    )


@login_required
def model_detail(request: HttpRequest, name: str) -> HttpResponse:
    model = get_object_or_404(selectors.registered_models_visible_to(request.user), name=name)
    versions = model.versions.order_by("-version")
    alias_by_version: dict[int, list[str]] = {}
    for alias, number in model.aliases.items():
        alias_by_version.setdefault(int(number), []).append(alias)
    rows = [(v, sorted(alias_by_version.get(v.version, []))) for v in versions]
    return render(request, "registry/model_detail.html", {"model": model, "rows": rows})


@login_required
def version_detail(request: HttpRequest, name: str, version: int) -> HttpResponse:
    try:
        mv = selectors.model_version_get(request.user, name=name, version=version)
    except ModelVersion.DoesNotExist:
        raise Http404(f"{name} has no version {version}") from None
    aliases = sorted(a for a, v in mv.registered_model.aliases.items() if int(v) == mv.version)
    example = json.dumps(mv.input_example, indent=1) if mv.input_example else ""
    return render(
        request,
        "registry/version_detail.html",
        {"mv": mv, "aliases": aliases, "example": example[:3000]},
    )


@login_required
def compare(request: HttpRequest, name: str) -> HttpResponse:
    """Two versions side by side: metrics, params and the signature diff (``?a=1&b=2``)."""
    model = get_object_or_404(selectors.registered_models_visible_to(request.user), name=name)
    try:
        query = validated_query(VersionPairQuery, request.GET)
    except BadQuery as exc:
        return bad_request_page(
            request, str(exc), back_url=reverse("registry:model", args=[model.name])
        )
    versions = list(model.versions.order_by("-version"))
    a = query.get("a") or (versions[1].version if len(versions) > 1 else 0)
    b = query.get("b") or (versions[0].version if versions else 0)
    by_number = {v.version: v for v in versions}
    if a not in by_number or b not in by_number:
        raise Http404(f"{name} has no version {a if a not in by_number else b}")
    old, new = by_number[a], by_number[b]
    return render(
        request,
        "registry/compare.html",
        {
            "model": model,
            "versions": versions,
            "old": old,
            "new": new,
            "metrics": compare_versions.metric_rows(new.metrics, old.metrics),
            "params": compare_versions.param_rows(old.params, new.params),
            "diff": compare_versions.signature_diff(old.signature, new.signature),
        },
    )


@login_required
@require_POST
def sync_now(request: HttpRequest) -> HttpResponse:
    if not can_sync_registry(request.user):
        raise PermissionDenied("Only data scientists, reviewers and platform admins can sync.")
    enqueue_on_commit(tasks.sync_registry, request.user.pk)
    messages.info(request, "Registry sync queued; new versions appear in a few seconds.")
    target = request.POST.get("next", "")
    if not url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        target = "registry:catalog"  # never redirect off-site (open redirect)
    return redirect(target)

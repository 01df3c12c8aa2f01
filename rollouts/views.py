from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from portal.roles import can_request_deployment, can_review
from registry import selectors as registry_selectors
from registry.models import ModelVersion
from rollouts import selectors, services
from rollouts.forms import DeploymentRequestForm, ReviewForm
from rollouts.models import Deployment, DeploymentRequest


def _visible_request(request: HttpRequest, request_id: int) -> DeploymentRequest:
    try:
        return selectors.deployment_request_detail(request.user, request_id)
    except DeploymentRequest.DoesNotExist:
        raise Http404(f"No deployment request #{request_id}.") from None


@login_required
def request_list(request: HttpRequest) -> HttpResponse:
    status = request.GET.get("status", "")
    requests_qs = selectors.deployment_requests_visible_to(request.user)
    if status in DeploymentRequest.Status.values:
        requests_qs = requests_qs.filter(status=status)
    if model := request.GET.get("model", "").strip():
        requests_qs = requests_qs.filter(model_version__registered_model__name=model)
    return render(
        request,
        "rollouts/request_list.html",
        {
            "requests": requests_qs[:200],
            "queue": selectors.review_queue(request.user),
            "status": status,
            "statuses": DeploymentRequest.Status.choices,
        },
    )


@login_required
def request_create(request: HttpRequest, name: str, version: int) -> HttpResponse:
    if not can_request_deployment(request.user):
        raise PermissionDenied("Only data scientists can request deployments.")
    try:
        mv: ModelVersion = registry_selectors.model_version_get(name=name, version=version)
    except ModelVersion.DoesNotExist:
        raise Http404(f"{name} has no version {version}.") from None
    form = DeploymentRequestForm(request.POST or None)
    status = 200
    if request.method == "POST":
        if form.is_valid():
            try:
                req = services.deployment_request_create(
                    requester=request.user,
                    model_version=mv,
                    environment=form.cleaned_data["environment"],
                    strategy=form.cleaned_data["strategy"],
                    justification=form.cleaned_data["justification"],
                )
            except ValidationError as exc:
                for field, errors in exc.message_dict.items():
                    form.add_error(field if field in form.fields else None, errors)
            else:
                messages.success(request, f"Request #{req.pk} sent to reviewers.")
                return redirect(req)
        status = 400
    return render(request, "rollouts/request_form.html", {"form": form, "mv": mv}, status=status)


@login_required
def request_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    req = _visible_request(request, request_id)
    template = "rollouts/_request_status.html" if request.htmx else "rollouts/request_detail.html"
    return render(request, template, _detail_context(request, req))


def _detail_context(request: HttpRequest, req: DeploymentRequest, **extra) -> dict:
    return {
        "req": req,
        "deployment": Deployment.objects.filter(request=req).first(),
        "review_form": ReviewForm(),
        "can_decide": (
            req.status == DeploymentRequest.Status.AWAITING_REVIEW
            and can_review(request.user)
            and req.requester_id != request.user.pk
        ),
        "can_cancel": req.requester_id == request.user.pk
        and DeploymentRequest.Status.CANCELLED in DeploymentRequest.TRANSITIONS[req.status],
        **extra,
    }


def _decide(request: HttpRequest, request_id: int, action: str) -> HttpResponse:
    req = _visible_request(request, request_id)
    form = ReviewForm(request.POST)
    comment = form.data.get("comment", "")[:4000]
    try:
        if action == "approve":
            services.deployment_request_approve(request_id=req.pk, reviewer=request.user, comment=comment)
            messages.success(request, f"Request #{req.pk} approved; the deployment starts now.")
        elif action == "reject":
            services.deployment_request_reject(request_id=req.pk, reviewer=request.user, comment=comment)
            messages.success(request, f"Request #{req.pk} rejected.")
        else:
            services.deployment_request_cancel(request_id=req.pk, actor=request.user)
            messages.success(request, f"Request #{req.pk} cancelled.")
    except services.InvalidTransition as exc:
        req.refresh_from_db()
        return render(request, "rollouts/request_detail.html", _detail_context(request, req, error=str(exc)), status=409)
    except ValidationError as exc:
        return render(request, "rollouts/request_detail.html", _detail_context(request, req, error=" ".join(exc.messages)), status=400)
    return redirect(req)


@login_required
@require_POST
def request_approve(request: HttpRequest, request_id: int) -> HttpResponse:
    return _decide(request, request_id, "approve")


@login_required
@require_POST
def request_reject(request: HttpRequest, request_id: int) -> HttpResponse:
    return _decide(request, request_id, "reject")


@login_required
@require_POST
def request_cancel(request: HttpRequest, request_id: int) -> HttpResponse:
    return _decide(request, request_id, "cancel")


@login_required
def endpoint_list(request: HttpRequest) -> HttpResponse:
    return render(request, "rollouts/endpoint_list.html", {"rows": selectors.endpoints_with_live_versions()})

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.utils import timezone
from django.views.decorators.http import require_POST

from portal.errors import Conflict
from portal.roles import can_request_deployment, can_review, is_platform_admin
from registry import selectors as registry_selectors
from registry.compare import metric_rows, signature_diff
from registry.mlflow_client import RegistryError
from registry.models import ModelVersion
from rollouts import selectors, services
from rollouts.forms import ApiKeyForm, DeploymentRequestForm, ReviewForm
from rollouts.models import ApiKey, Deployment, DeploymentRequest, Review


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


#: The request form's fields for the canary parameters a ValidationError names.
CANARY_FIELDS = {"steps": "canary_steps", "interval_s": "canary_interval_s"}


@login_required
def request_create(request: HttpRequest, name: str, version: int) -> HttpResponse:
    if not can_request_deployment(request.user):
        raise PermissionDenied("Only data scientists can request deployments.")
    try:
        mv: ModelVersion = registry_selectors.model_version_get(
            request.user, name=name, version=version
        )
    except ModelVersion.DoesNotExist:
        raise Http404(f"{name} has no version {version}.") from None
    previous = None
    if previous_id := request.GET.get("again") or request.POST.get("again"):
        if not (previous_id.isascii() and previous_id.isdigit()):
            return HttpResponseBadRequest("again must be the number of the request to ask again.")
        previous = (
            selectors.deployment_requests_visible_to(request.user).filter(pk=previous_id).first()
        )
    initial = (
        {"environment": previous.endpoint.environment_id, "justification": previous.justification}
        if previous
        else {}
    )
    form = DeploymentRequestForm(request.POST or None, initial=initial)
    status = 200
    if request.method == "POST":
        status = 400
        if form.is_valid():
            try:
                if previous is not None:
                    req = services.deployment_request_resubmit(
                        request_id=previous.pk,
                        requester=request.user,
                        justification=form.cleaned_data["justification"],
                    )
                else:
                    req = services.deployment_request_create(
                        requester=request.user,
                        model_version=mv,
                        environment=form.cleaned_data["environment"],
                        strategy=form.cleaned_data["strategy"],
                        strategy_params=form.strategy_params(),
                        justification=form.cleaned_data["justification"],
                    )
            except ValidationError as exc:
                for field, errors in exc.message_dict.items():
                    field = CANARY_FIELDS.get(field, field)
                    form.add_error(field if field in form.fields else None, errors)
            except Conflict as exc:
                # Asking again while the old request is still open: a state conflict, not bad input.
                form.add_error(None, str(exc))
                status = 409
            else:
                messages.success(
                    request, f"Request #{req.pk} created; its automated gates are running."
                )
                return redirect(req)
    return render(
        request,
        "rollouts/request_form.html",
        {"form": form, "mv": mv, "previous": previous},
        status=status,
    )


@login_required
def request_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    req = _visible_request(request, request_id)
    template = "rollouts/_request_status.html" if request.htmx else "rollouts/request_detail.html"
    return render(request, template, _detail_context(request, req))


def _detail_context(request: HttpRequest, req: DeploymentRequest, **extra) -> dict:
    env = req.endpoint.environment
    champion = services.champion_of(req.endpoint)
    if champion is not None and champion.pk == req.model_version_id:
        champion = None
    reviews = list(req.reviews.all())
    approvals = sum(r.decision == Review.Decision.APPROVE for r in reviews)
    user = request.user
    in_approver_group = user.groups.filter(name=services.approver_group_name(env)).exists()
    now = timezone.now()
    return {
        "req": req,
        "deployment": Deployment.objects.filter(request=req).first(),
        "review_form": ReviewForm(),
        "gate_results": list(req.gate_results.all()),
        "champion": champion,
        "metrics": metric_rows(req.model_version.metrics, champion.metrics if champion else None),
        "diff": signature_diff(champion.signature, req.model_version.signature)
        if champion
        else None,
        "approvals": approvals,
        "required_approvals": env.required_approvals,
        "approver_group": services.approver_group_name(env),
        "freeze": env.active_freeze(now),
        # Membership may have shrunk since the policy was saved: say so before anyone waits.
        "policy_problem": selectors.approval_policy_problem(
            env,
            requester=req.requester,
            approved_by={r.reviewer_id for r in reviews if r.decision == Review.Decision.APPROVE},
        )
        if req.status in DeploymentRequest.UNDECIDED
        else "",
        "can_decide": (
            req.status == DeploymentRequest.Status.AWAITING_REVIEW
            and in_approver_group
            and req.requester_id != user.pk
            and not any(r.reviewer_id == user.pk for r in reviews)
        ),
        "can_cancel": (req.requester_id == user.pk or is_platform_admin(user))
        and DeploymentRequest.Status.CANCELLED in DeploymentRequest.TRANSITIONS[req.status],
        "can_resubmit": req.requester_id == user.pk
        and req.status in DeploymentRequest.RESUBMITTABLE,
        "can_override_freeze": is_platform_admin(user)
        and req.status in DeploymentRequest.UNDECIDED,
        **extra,
    }


DOMAIN_ERRORS = (Conflict, ValidationError, RegistryError)


def _domain_error(exc: Exception) -> tuple[int, str]:
    """(HTTP status, message) of a domain error raised by a service, for the pages."""
    if isinstance(exc, Conflict):
        return 409, str(exc)
    if isinstance(exc, ValidationError):
        return 400, " ".join(exc.messages)
    return 503, f"MLflow cannot be reached: {exc}"


def _act(request: HttpRequest, request_id: int, action) -> HttpResponse:
    """Run one service call for the request; domain errors become a 4xx page that says why."""
    req = _visible_request(request, request_id)
    try:
        message = action(req)
    except DOMAIN_ERRORS as exc:
        status, error = _domain_error(exc)
    else:
        messages.success(request, message)
        return redirect(req)
    req = _visible_request(request, request_id)
    return render(
        request,
        "rollouts/request_detail.html",
        _detail_context(request, req, error=error),
        status=status,
    )


def _text(request: HttpRequest, field: str) -> str:
    return request.POST.get(field, "")[:4000]


@login_required
@require_POST
def request_approve(request: HttpRequest, request_id: int) -> HttpResponse:
    def approve(req):
        services.deployment_request_approve(
            request_id=req.pk, reviewer=request.user, comment=_text(request, "comment")
        )
        return f"Approval of request #{req.pk} recorded."

    return _act(request, request_id, approve)


@login_required
@require_POST
def request_reject(request: HttpRequest, request_id: int) -> HttpResponse:
    def reject(req):
        services.deployment_request_reject(
            request_id=req.pk, reviewer=request.user, comment=_text(request, "comment")
        )
        return f"Request #{req.pk} rejected."

    return _act(request, request_id, reject)


@login_required
@require_POST
def request_cancel(request: HttpRequest, request_id: int) -> HttpResponse:
    def cancel(req):
        services.deployment_request_cancel(request_id=req.pk, actor=request.user)
        return f"Request #{req.pk} cancelled."

    return _act(request, request_id, cancel)


@login_required
@require_POST
def request_comment(request: HttpRequest, request_id: int) -> HttpResponse:
    def comment(req):
        services.deployment_request_comment(
            request_id=req.pk, author=request.user, body=_text(request, "body")
        )
        return "Comment added."

    return _act(request, request_id, comment)


@login_required
@require_POST
def request_override_freeze(request: HttpRequest, request_id: int) -> HttpResponse:
    def override(req):
        services.deployment_request_override_freeze(
            request_id=req.pk, actor=request.user, reason=_text(request, "reason")
        )
        return f"Request #{req.pk} may be released during the freeze."

    return _act(request, request_id, override)


@login_required
def endpoint_list(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "rollouts/endpoint_list.html",
        {"rows": selectors.endpoints_with_live_versions(request.user)},
    )


@login_required
def endpoint_timeline(request: HttpRequest, name: str) -> HttpResponse:
    endpoint = get_object_or_404(selectors.endpoints_visible_to(request.user), name=name)
    return render(
        request,
        "rollouts/endpoint_timeline.html",
        {
            "endpoint": endpoint,
            "timeline": list(reversed(selectors.traffic_timeline(endpoint))),
            "deleted_live": selectors.live_deployments_of_deleted_versions(endpoint),
            "can_roll_back": can_review(request.user) or is_platform_admin(request.user),
            "restorable": selectors.restorable_versions(endpoint),
        },
    )


@login_required
@require_POST
def endpoint_rollback(request: HttpRequest, name: str) -> HttpResponse:
    endpoint = get_object_or_404(selectors.endpoints_visible_to(request.user), name=name)
    raw_version = request.POST.get("version", "").strip()
    if raw_version and not (
        raw_version.isascii() and raw_version.isdigit() and len(raw_version) < 10
    ):
        return HttpResponseBadRequest("version must be a version number of this model.")
    try:
        restored = services.deployment_rollback(
            endpoint_id=endpoint.pk,
            actor=request.user,
            reason=_text(request, "reason"),
            to_version=int(raw_version) if raw_version else None,
        )
    except DOMAIN_ERRORS as exc:
        status, error = _domain_error(exc)
        return render(
            request,
            "rollouts/endpoint_timeline.html",
            {
                "endpoint": endpoint,
                "timeline": list(reversed(selectors.traffic_timeline(endpoint))),
                "deleted_live": selectors.live_deployments_of_deleted_versions(endpoint),
                "can_roll_back": True,
                "restorable": selectors.restorable_versions(endpoint),
                "error": error,
            },
            status=status,
        )
    messages.success(request, f"{endpoint.name} rolled back to {restored.model_version}.")
    return redirect("rollouts:endpoint_timeline", name=endpoint.name)


# --- API keys of client applications (platform admins) ---------------------------------------


def _api_keys_page(request: HttpRequest, form: ApiKeyForm, status: int = 200, **extra):
    keys = ApiKey.objects.select_related("created_by").prefetch_related("endpoints")
    response = render(
        request, "rollouts/api_keys.html", {"keys": keys, "form": form, **extra}, status=status
    )
    response["Cache-Control"] = "no-store"  # the page after a creation holds a plaintext key
    return response


#: Where the plaintext of a key just created waits for the page that shows it, once.
NEW_KEY_SESSION = "rollgate:new-api-key"


@login_required
def api_key_list(request: HttpRequest) -> HttpResponse:
    """Lists every key; a POST creates one and redirects to this page, which shows the new
    key's plaintext once (kept in the server-side session until then, never stored with the
    key). Reloading the page neither creates another key nor shows it again."""
    if not is_platform_admin(request.user):
        raise PermissionDenied("Only platform admins manage API keys.")
    if request.method != "POST":
        created = request.session.pop(NEW_KEY_SESSION, None)
        extra = {}
        if created and (key := ApiKey.objects.filter(pk=created["id"]).first()):
            extra = {"created": key, "raw_key": created["key"]}
        return _api_keys_page(request, ApiKeyForm(), **extra)
    form = ApiKeyForm(request.POST)
    if not form.is_valid():
        return _api_keys_page(request, form, status=400)
    try:
        key, raw = services.api_key_create(
            name=form.cleaned_data["name"],
            endpoints=list(form.cleaned_data["endpoints"]),
            created_by=request.user,
            rate_limit_per_minute=form.cleaned_data["rate_limit_per_minute"],
        )
    except ValidationError as exc:
        for name, errors in exc.message_dict.items():
            form.add_error(name if name in form.fields else None, errors)
        return _api_keys_page(request, form, status=400)
    request.session[NEW_KEY_SESSION] = {"id": key.pk, "key": raw}
    return redirect("rollouts:api_keys")


@login_required
@require_POST
def api_key_revoke(request: HttpRequest, key_id: int) -> HttpResponse:
    if not is_platform_admin(request.user):
        raise PermissionDenied("Only platform admins manage API keys.")
    try:
        key = services.api_key_revoke(key_id=key_id, actor=request.user)
    except ApiKey.DoesNotExist:
        raise Http404(f"No API key #{key_id}.") from None
    messages.success(request, f"Revoked {key}: it is refused from now on.")
    return redirect("rollouts:api_keys")


# --- the rollout page (canary steps, verdicts, controls) -------------------------------------


def _rollout_context(request: HttpRequest, req: DeploymentRequest, **extra) -> dict:
    rollout = getattr(req, "rollout", None)
    if rollout is None:
        raise Http404(f"Request #{req.pk} has no rollout yet (it is {req.get_status_display()}).")
    steps = list(rollout.steps.all())
    for step in steps:
        step.checks = (step.figures or {}).get("checks", [])
    live = Deployment.objects.filter(
        endpoint=req.endpoint, status=Deployment.Status.LIVE
    ).select_related("model_version")
    now = timezone.now()
    return {
        "req": req,
        "rollout": rollout,
        "steps": steps,
        "live": live,
        "seconds_to_check": max(0, int((rollout.next_check_at - now).total_seconds()))
        if rollout.next_check_at and rollout.is_active
        else None,
        "can_control": rollout.is_active
        and req.status == DeploymentRequest.Status.ROLLING_OUT
        and (can_review(request.user) or is_platform_admin(request.user)),
        **extra,
    }


@login_required
def rollout_detail(request: HttpRequest, request_id: int) -> HttpResponse:
    """The request's rollout: steps, weights, time to the next check, each analysis beside its
    thresholds, and the controls; htmx refreshes the live part every two seconds."""
    req = _visible_request(request, request_id)
    template = "rollouts/_rollout_live.html" if request.htmx else "rollouts/rollout_detail.html"
    return render(request, template, _rollout_context(request, req))


@login_required
@require_POST
def rollout_control(request: HttpRequest, request_id: int, action: str) -> HttpResponse:
    from rollouts.executor import rollout_control as control

    req = _visible_request(request, request_id)
    context = _rollout_context(request, req)
    try:
        control(
            rollout_id=context["rollout"].pk,
            actor=request.user,
            action=action,
            reason=_text(request, "reason"),
        )
    except DOMAIN_ERRORS as exc:
        status, error = _domain_error(exc)
        return render(
            request,
            "rollouts/rollout_detail.html",
            _rollout_context(request, _visible_request(request, request_id), error=error),
            status=status,
        )
    messages.success(request, f"Rollout of request #{req.pk}: {action} done.")
    return redirect("rollouts:rollout", request_id=req.pk)

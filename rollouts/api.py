"""REST API of deployment requests, environments, API keys and endpoints: one small view per
operation, each calling the same service as the HTML pages.

Input serializers never accept status, reviewer, requester or ownership fields: those come from
the signed-in user and the services. Reads go through ``rollouts.selectors``, so a data
scientist of another team gets 404 for a request or endpoint they may not see.
"""

from __future__ import annotations

from django.contrib.auth.models import Group
from django.http import Http404
from django.shortcuts import get_object_or_404
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response

from portal.api import ApiView, IsPlatformAdmin
from registry import selectors as registry_selectors
from registry.models import ModelVersion
from rollouts import gates, selectors, services
from rollouts.models import (
    ApiKey,
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    FreezeWindow,
    Review,
    Strategy,
)


class ApiKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    """Documents ``rollouts.auth.ApiKeyAuthentication`` (``Authorization: Bearer <key>``)."""

    target_class = "rollouts.auth.ApiKeyAuthentication"
    name = "apiKey"

    def get_security_definition(self, auto_schema):
        return build_bearer_security_scheme_object(
            header_name="Authorization", token_prefix="Bearer"
        )


# --- Deployment requests ----------------------------------------------------------------------


class DeploymentRequestOut(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    status_reason = serializers.CharField()
    model = serializers.CharField(source="model_version.registered_model.name")
    version = serializers.IntegerField(source="model_version.version")
    environment = serializers.CharField(source="endpoint.environment.name")
    endpoint = serializers.CharField(source="endpoint.name")
    strategy = serializers.CharField()
    strategy_params = serializers.DictField()
    justification = serializers.CharField()
    requester = serializers.CharField(source="requester.username")
    created_at = serializers.DateTimeField()
    decided_at = serializers.DateTimeField(allow_null=True)
    live_at = serializers.DateTimeField(allow_null=True)


class GateResultOut(serializers.Serializer):
    name = serializers.CharField()
    label = serializers.CharField()
    passed = serializers.BooleanField()
    summary = serializers.CharField()
    details = serializers.JSONField()
    artifact_digest = serializers.CharField()
    seconds = serializers.FloatField()


class ReviewOut(serializers.Serializer):
    reviewer = serializers.CharField(source="reviewer.username")
    decision = serializers.CharField()
    comment = serializers.CharField()
    created_at = serializers.DateTimeField()


class CommentOut(serializers.Serializer):
    id = serializers.IntegerField()
    author = serializers.CharField(source="author.username")
    body = serializers.CharField()
    created_at = serializers.DateTimeField()


class DeploymentRequestDetailOut(DeploymentRequestOut):
    """A request with its evidence and discussion, as on its page."""

    previous_request = serializers.IntegerField(source="previous_request_id", allow_null=True)
    artifact_digest = serializers.CharField()
    expires_at = serializers.DateTimeField(allow_null=True)
    approvals = serializers.SerializerMethodField()
    required_approvals = serializers.IntegerField(source="endpoint.environment.required_approvals")
    approver_group = serializers.SerializerMethodField()
    freeze_override_reason = serializers.CharField()
    freeze_override_by = serializers.CharField(
        source="freeze_override_by.username", allow_null=True
    )
    gate_results = GateResultOut(many=True)
    reviews = ReviewOut(many=True)
    comments = CommentOut(many=True)

    def get_approvals(self, req: DeploymentRequest) -> int:
        """Distinct approvals recorded so far."""
        return sum(r.decision == Review.Decision.APPROVE for r in req.reviews.all())

    def get_approver_group(self, req: DeploymentRequest) -> str:
        return services.approver_group_name(req.endpoint.environment)

    policy_problem = serializers.SerializerMethodField()

    def get_policy_problem(self, req: DeploymentRequest) -> str:
        """Why this undecided request cannot get its approvals (the approver group shrank
        after it was opened), or ``""``."""
        if req.status not in DeploymentRequest.UNDECIDED:
            return ""
        return selectors.approval_policy_problem(
            req.endpoint.environment,
            requester=req.requester,
            approved_by={
                r.reviewer_id for r in req.reviews.all() if r.decision == Review.Decision.APPROVE
            },
        )


def _visible(request: Request, request_id: int) -> DeploymentRequest:
    """The request with its reviews, comments and gate results; 404 when not visible."""
    try:
        return selectors.deployment_request_detail(request.user, request_id)
    except DeploymentRequest.DoesNotExist:
        raise Http404(f"No deployment request #{request_id}.") from None


def _detail(request: Request, request_id: int, *, code: int = status.HTTP_200_OK) -> Response:
    return Response(DeploymentRequestDetailOut(_visible(request, request_id)).data, status=code)


class DeploymentRequestListApi(ApiView):
    """``GET /api/requests[?status=]``; ``POST /api/requests`` opens a request (data
    scientists of the model's team)."""

    class InputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=255)
        version = serializers.IntegerField(min_value=1)
        environment = serializers.SlugRelatedField(
            slug_field="name", queryset=Environment.objects.all()
        )
        strategy = serializers.ChoiceField(choices=Strategy.choices, default=Strategy.DIRECT)
        strategy_params = serializers.DictField(
            required=False,
            default=dict,
            help_text='canary: {"steps": [10, 25, 50, 100], "interval_s": 300, '
            '"max_extensions": 3}; missing ones from the environment\'s rollout_defaults',
        )
        justification = serializers.CharField(max_length=4000)

    @extend_schema(
        parameters=[OpenApiParameter("status", str, enum=DeploymentRequest.Status.values)],
        responses=DeploymentRequestOut(many=True),
    )
    def get(self, request: Request) -> Response:
        qs = selectors.deployment_requests_visible_to(request.user)
        if (wanted := request.query_params.get("status")) in DeploymentRequest.Status.values:
            qs = qs.filter(status=wanted)
        return Response(DeploymentRequestOut(qs[:500], many=True).data)

    @extend_schema(request=InputSerializer, responses={201: DeploymentRequestOut})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            # Scoped: a version the user may not see is as unknown as a missing one.
            mv = registry_selectors.model_version_get(
                request.user,
                name=data.validated_data["model"],
                version=data.validated_data["version"],
            )
        except ModelVersion.DoesNotExist:
            raise serializers.ValidationError(
                {"version": "No such model version; sync the registry first?"}
            ) from None
        req = services.deployment_request_create(
            requester=request.user,
            model_version=mv,
            environment=data.validated_data["environment"],
            strategy=data.validated_data["strategy"],
            strategy_params=data.validated_data["strategy_params"],
            justification=data.validated_data["justification"],
        )
        return Response(DeploymentRequestOut(req).data, status=status.HTTP_201_CREATED)


class DeploymentRequestDetailApi(ApiView):
    """``GET /api/requests/<id>``: the request, its gate results, reviews and comments."""

    @extend_schema(responses=DeploymentRequestDetailOut)
    def get(self, request: Request, request_id: int) -> Response:
        return _detail(request, request_id)


class ReviewInput(serializers.Serializer):
    comment = serializers.CharField(max_length=4000, required=False, allow_blank=True, default="")


class DeploymentRequestApproveApi(ApiView):
    """``POST /api/requests/<id>/approve``: one approval from the environment's approver group
    (never the requester); the N-th approves the request and launches its deployment."""

    @extend_schema(request=ReviewInput, responses=DeploymentRequestDetailOut)
    def post(self, request: Request, request_id: int) -> Response:
        _visible(request, request_id)
        data = ReviewInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.deployment_request_approve(
            request_id=request_id, reviewer=request.user, comment=data.validated_data["comment"]
        )
        return _detail(request, request_id)


class RejectInput(serializers.Serializer):
    comment = serializers.CharField(max_length=4000, help_text="why: required, not blank")


class DeploymentRequestRejectApi(ApiView):
    """``POST /api/requests/<id>/reject {comment}``: the comment is required."""

    @extend_schema(request=RejectInput, responses=DeploymentRequestDetailOut)
    def post(self, request: Request, request_id: int) -> Response:
        _visible(request, request_id)
        data = RejectInput(data=request.data)
        data.is_valid(raise_exception=True)
        services.deployment_request_reject(
            request_id=request_id, reviewer=request.user, comment=data.validated_data["comment"]
        )
        return _detail(request, request_id)


class DeploymentRequestCancelApi(ApiView):
    """``POST /api/requests/<id>/cancel``: the requester withdraws the request."""

    @extend_schema(request=None, responses=DeploymentRequestDetailOut)
    def post(self, request: Request, request_id: int) -> Response:
        _visible(request, request_id)
        services.deployment_request_cancel(request_id=request_id, actor=request.user)
        return _detail(request, request_id)


class DeploymentRequestResubmitApi(ApiView):
    """``POST /api/requests/<id>/resubmit {justification}``: the original requester asks again
    after a rejection, failed gates, expiry, cancellation or a failed deployment (201, the new
    request, linked to the old one)."""

    class InputSerializer(serializers.Serializer):
        justification = serializers.CharField(max_length=4000)

    @extend_schema(request=InputSerializer, responses={201: DeploymentRequestDetailOut})
    def post(self, request: Request, request_id: int) -> Response:
        _visible(request, request_id)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        new = services.deployment_request_resubmit(
            request_id=request_id,
            requester=request.user,
            justification=data.validated_data["justification"],
        )
        return _detail(request, new.pk, code=status.HTTP_201_CREATED)


class DeploymentRequestOverrideFreezeApi(ApiView):
    """``POST /api/requests/<id>/override-freeze {reason}`` (platform admins): the request may be
    released during a freeze window."""

    class InputSerializer(serializers.Serializer):
        reason = serializers.CharField(max_length=4000)

    @extend_schema(request=InputSerializer, responses=DeploymentRequestDetailOut)
    def post(self, request: Request, request_id: int) -> Response:
        _visible(request, request_id)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        services.deployment_request_override_freeze(
            request_id=request_id, actor=request.user, reason=data.validated_data["reason"]
        )
        return _detail(request, request_id)


class DeploymentRequestCommentsApi(ApiView):
    """``GET /api/requests/<id>/comments``; ``POST {body}`` adds one (anyone who sees the
    request)."""

    class InputSerializer(serializers.Serializer):
        body = serializers.CharField(max_length=4000)

    @extend_schema(responses=CommentOut(many=True))
    def get(self, request: Request, request_id: int) -> Response:
        return Response(CommentOut(_visible(request, request_id).comments.all(), many=True).data)

    @extend_schema(request=InputSerializer, responses={201: CommentOut})
    def post(self, request: Request, request_id: int) -> Response:
        _visible(request, request_id)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        comment = services.deployment_request_comment(
            request_id=request_id, author=request.user, body=data.validated_data["body"]
        )
        return Response(CommentOut(comment).data, status=status.HTTP_201_CREATED)


# --- Environments and their approval policies -------------------------------------------------


class EnvironmentOut(serializers.Serializer):
    name = serializers.CharField()
    description = serializers.CharField()
    order = serializers.IntegerField()
    required_approvals = serializers.IntegerField()
    approver_group = serializers.CharField(source="approver_group.name", allow_null=True)
    requires_live_in = serializers.CharField(source="requires_live_in.name", allow_null=True)
    gates = serializers.ListField(child=serializers.CharField())
    metric_tolerance = serializers.FloatField()
    request_expiry_days = serializers.IntegerField()
    allowed_strategies = serializers.ListField(child=serializers.CharField())
    rollout_defaults = serializers.DictField()
    analysis_policy = serializers.DictField()
    policy_problem = serializers.SerializerMethodField()

    def get_policy_problem(self, env: Environment) -> str:
        """Why no request could meet this policy today (membership shrank), or ``""``."""
        return selectors.approval_policy_problem(env)


class FreezeWindowOut(serializers.Serializer):
    id = serializers.IntegerField()
    environment = serializers.CharField(source="environment.name")
    starts_at = serializers.DateTimeField()
    ends_at = serializers.DateTimeField()
    reason = serializers.CharField()


def _environment(name: str) -> Environment:
    return get_object_or_404(
        Environment.objects.select_related("approver_group", "requires_live_in"), name=name
    )


class EnvironmentListApi(ApiView):
    """``GET /api/environments``: every environment with its approval policy."""

    @extend_schema(responses=EnvironmentOut(many=True))
    def get(self, request: Request) -> Response:
        envs = Environment.objects.select_related("approver_group", "requires_live_in")
        return Response(EnvironmentOut(envs, many=True).data)


class EnvironmentDetailApi(ApiView):
    """``GET /api/environments/<name>``; ``PATCH`` changes its policy (platform admins), with
    the approver group and the environment of the promotion path given by name."""

    class InputSerializer(serializers.Serializer):
        required_approvals = serializers.IntegerField(min_value=1, max_value=10, required=False)
        approver_group = serializers.SlugRelatedField(
            slug_field="name", queryset=Group.objects.all(), allow_null=True, required=False
        )
        requires_live_in = serializers.SlugRelatedField(
            slug_field="name", queryset=Environment.objects.all(), allow_null=True, required=False
        )
        gates = serializers.ListField(
            child=serializers.ChoiceField(choices=gates.ALL_GATES), required=False
        )
        metric_tolerance = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
        request_expiry_days = serializers.IntegerField(min_value=1, required=False)
        allowed_strategies = serializers.ListField(
            child=serializers.ChoiceField(choices=Strategy.values), allow_empty=False,
            required=False,
        )  # fmt: skip
        rollout_defaults = serializers.DictField(child=serializers.DictField(), required=False)
        analysis_policy = serializers.DictField(required=False)

        def validate(self, attrs):
            if not attrs:
                raise serializers.ValidationError("Send at least one policy field.")
            return attrs

    def get_permissions(self):
        if self.request.method == "PATCH":
            return [permissions.IsAuthenticated(), IsPlatformAdmin()]
        return super().get_permissions()

    @extend_schema(responses=EnvironmentOut)
    def get(self, request: Request, name: str) -> Response:
        return Response(EnvironmentOut(_environment(name)).data)

    @extend_schema(request=InputSerializer, responses=EnvironmentOut)
    def patch(self, request: Request, name: str) -> Response:
        env = _environment(name)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        env = services.environment_policy_update(
            environment_id=env.pk, actor=request.user, changes=dict(data.validated_data)
        )
        return Response(EnvironmentOut(_environment(env.name)).data)


class FreezeWindowListApi(ApiView):
    """``GET /api/environments/<name>/freeze-windows``; ``POST {starts_at, ends_at, reason}``
    schedules one (platform admins)."""

    class InputSerializer(serializers.Serializer):
        starts_at = serializers.DateTimeField()
        ends_at = serializers.DateTimeField()
        reason = serializers.CharField(max_length=255)

    def get_permissions(self):
        if self.request.method == "POST":
            return [permissions.IsAuthenticated(), IsPlatformAdmin()]
        return super().get_permissions()

    @extend_schema(responses=FreezeWindowOut(many=True))
    def get(self, request: Request, name: str) -> Response:
        windows = _environment(name).freeze_windows.select_related("environment")
        return Response(FreezeWindowOut(windows, many=True).data)

    @extend_schema(request=InputSerializer, responses={201: FreezeWindowOut})
    def post(self, request: Request, name: str) -> Response:
        env = _environment(name)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        window: FreezeWindow = services.freeze_window_create(
            environment=env, actor=request.user, **data.validated_data
        )
        return Response(FreezeWindowOut(window).data, status=status.HTTP_201_CREATED)


# --- API keys of client applications ----------------------------------------------------------


class ApiKeyOut(serializers.Serializer):
    id = serializers.IntegerField()
    name = serializers.CharField()
    prefix = serializers.CharField()
    endpoints = serializers.SerializerMethodField()
    rate_limit_per_minute = serializers.IntegerField(allow_null=True)
    created_by = serializers.CharField(source="created_by.username", allow_null=True)
    created_at = serializers.DateTimeField()
    revoked_at = serializers.DateTimeField(allow_null=True)

    def get_endpoints(self, key: ApiKey) -> list[str]:
        return sorted(e.name for e in key.endpoints.all())


class ApiKeyCreatedOut(ApiKeyOut):
    key = serializers.CharField(help_text="the plaintext key: shown once, never stored")


class ApiKeyListApi(ApiView):
    """``GET /api/api-keys``; ``POST {name, endpoints: [endpoint names],
    rate_limit_per_minute?}`` creates a key and returns it in plain text, once (platform
    admins)."""

    permission_classes = [permissions.IsAuthenticated, IsPlatformAdmin]

    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=100)
        endpoints = serializers.SlugRelatedField(
            slug_field="name", queryset=Endpoint.objects.all(), many=True, allow_empty=False
        )
        rate_limit_per_minute = serializers.IntegerField(
            required=False, allow_null=True, min_value=1, max_value=1_000_000
        )

    @extend_schema(responses=ApiKeyOut(many=True))
    def get(self, request: Request) -> Response:
        keys = ApiKey.objects.select_related("created_by").prefetch_related("endpoints")
        return Response(ApiKeyOut(keys, many=True).data)

    @extend_schema(request=InputSerializer, responses={201: ApiKeyCreatedOut})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        key, raw = services.api_key_create(
            name=data.validated_data["name"],
            endpoints=data.validated_data["endpoints"],
            created_by=request.user,
            rate_limit_per_minute=data.validated_data.get("rate_limit_per_minute"),
        )
        key.key = raw
        return Response(ApiKeyCreatedOut(key).data, status=status.HTTP_201_CREATED)


class ApiKeyRevokeApi(ApiView):
    """``POST /api/api-keys/<id>/revoke`` (platform admins); revoking twice changes nothing."""

    permission_classes = [permissions.IsAuthenticated, IsPlatformAdmin]

    @extend_schema(request=None, responses=ApiKeyOut)
    def post(self, request: Request, key_id: int) -> Response:
        key = services.api_key_revoke(key_id=key_id, actor=request.user)
        return Response(ApiKeyOut(key).data)


# --- Endpoints ----------------------------------------------------------------------------------


def _endpoint(request: Request, name: str) -> Endpoint:
    return get_object_or_404(selectors.endpoints_visible_to(request.user), name=name)


class EndpointListApi(ApiView):
    """``GET /api/endpoints``: the endpoints the user may see, with their live traffic split."""

    class OutputSerializer(serializers.Serializer):
        name = serializers.CharField()
        environment = serializers.CharField()
        registered_model = serializers.CharField()
        traffic = serializers.DictField(child=serializers.IntegerField())

    @extend_schema(responses=OutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        rows = [
            {
                "name": e.name,
                "environment": e.environment.name,
                "registered_model": e.registered_model.name,
                "traffic": {str(d.model_version.version): d.traffic_weight for d in live},
            }
            for e, live in selectors.endpoints_with_live_versions(request.user)
        ]
        return Response(self.OutputSerializer(rows, many=True).data)


class EndpointTimelineApi(ApiView):
    """``GET /api/endpoints/<name>/timeline``: what served when, oldest first."""

    class OutputSerializer(serializers.Serializer):
        start = serializers.DateTimeField()
        end = serializers.DateTimeField(allow_null=True, help_text="null for the current state")
        traffic = serializers.DictField(
            child=serializers.IntegerField(), help_text='percent per version, e.g. {"v1": 100}'
        )
        actor = serializers.CharField()

    @extend_schema(responses=OutputSerializer(many=True))
    def get(self, request: Request, name: str) -> Response:
        rows = selectors.traffic_timeline(_endpoint(request, name))
        return Response(self.OutputSerializer(rows, many=True).data)


class EndpointRollbackApi(ApiView):
    """``POST /api/endpoints/<name>/rollback {reason, version?}`` (reviewers and platform
    admins): the release before the live one, or ``version`` (any version live on this endpoint
    before and replaced since), serves again; returns the restored request. 409 for a version
    never live here."""

    class InputSerializer(serializers.Serializer):
        reason = serializers.CharField(max_length=4000)
        version = serializers.IntegerField(min_value=1, max_value=2**31 - 1, required=False)

    @extend_schema(request=InputSerializer, responses=DeploymentRequestDetailOut)
    def post(self, request: Request, name: str) -> Response:
        endpoint = _endpoint(request, name)
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        restored = services.deployment_rollback(
            endpoint_id=endpoint.pk,
            actor=request.user,
            reason=data.validated_data["reason"],
            to_version=data.validated_data.get("version"),
        )
        return _detail(request, restored.pk)


# --- Rollouts -----------------------------------------------------------------------------------


class RolloutStepOut(serializers.Serializer):
    index = serializers.IntegerField()
    planned_weight = serializers.IntegerField(help_text="percent of traffic to the new version")
    started_at = serializers.DateTimeField(allow_null=True)
    ended_at = serializers.DateTimeField(allow_null=True)
    verdict = serializers.CharField(help_text="pass, fail, inconclusive; empty: not judged")
    figures = serializers.DictField(help_text="the checks: canary and stable figures, rule, p")


class RolloutOut(serializers.Serializer):
    request = serializers.IntegerField(source="request_id")
    strategy = serializers.CharField()
    params = serializers.DictField(source="request.strategy_params")
    state = serializers.CharField()
    state_reason = serializers.CharField()
    next_check_at = serializers.DateTimeField(allow_null=True)
    traffic = serializers.SerializerMethodField()
    steps = RolloutStepOut(many=True)

    def get_traffic(self, rollout) -> dict[str, int]:
        live = Deployment.objects.filter(
            endpoint_id=rollout.request.endpoint_id, status=Deployment.Status.LIVE
        ).select_related("model_version")
        return {f"v{d.model_version.version}": d.traffic_weight for d in live}


def _rollout(request: Request, request_id: int):
    req = _visible(request, request_id)
    rollout = getattr(req, "rollout", None)
    if rollout is None:
        raise Http404(f"Request #{request_id} has no rollout yet.")
    return rollout


class RolloutApi(ApiView):
    """``GET /api/requests/<id>/rollout``: the request's rollout, its steps and verdicts."""

    @extend_schema(responses=RolloutOut)
    def get(self, request: Request, request_id: int) -> Response:
        return Response(RolloutOut(_rollout(request, request_id)).data)


class RolloutControlApi(ApiView):
    """``POST /api/requests/<id>/rollout/{pause,resume,promote,abort}`` ``{reason}`` (reviewers
    and platform admins; a reason is required to promote or abort). 409 on a finished
    rollout."""

    class InputSerializer(serializers.Serializer):
        reason = serializers.CharField(
            max_length=4000, required=False, allow_blank=True, default=""
        )

    @extend_schema(request=InputSerializer, responses=RolloutOut)
    def post(self, request: Request, request_id: int, action: str) -> Response:
        from rollouts.executor import rollout_control

        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        rollout = _rollout(request, request_id)
        rollout_control(
            rollout_id=rollout.pk,
            actor=request.user,
            action=action,
            reason=data.validated_data["reason"],
        )
        return Response(RolloutOut(_rollout(request, request_id)).data)

"""Ground-truth intake and per-version figures over REST."""

from __future__ import annotations

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema
from rest_framework import authentication, permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from monitoring import selectors, services
from portal.api import ApiView
from portal.roles import user_roles
from rollouts.auth import ApiKeyAuthentication, ApiKeyClient
from rollouts.selectors import endpoints_visible_to

MAX_FEEDBACK_ITEMS = 10_000


class IsClientOrPersona(permissions.BasePermission):
    """An API key, or a signed-in user who holds a Rollgate role."""

    def has_permission(self, request, view) -> bool:
        user = request.user
        if isinstance(user, ApiKeyClient):
            return True
        return bool(user and user.is_authenticated and user_roles(user))


class FeedbackItemSerializer(serializers.Serializer):
    request_id = serializers.UUIDField(required=False, help_text="the X-Request-Id answered")
    inference_id = serializers.CharField(
        max_length=128, required=False, help_text="the X-Inference-Id the client sent"
    )
    label = serializers.JSONField()
    row = serializers.IntegerField(min_value=0, required=False)

    def validate(self, attrs):
        if ("request_id" in attrs) == ("inference_id" in attrs):
            raise serializers.ValidationError(
                {"request_id": "Send exactly one of request_id and inference_id."}
            )
        return attrs

    def validate_label(self, value):
        if value is None:
            raise serializers.ValidationError("label must not be null.")
        return value


class FeedbackApi(ApiView):
    """``POST /api/feedback``: one ``{request_id | inference_id, label[, row]}`` object or a
    list of them (at most 10,000). Labels may arrive any time after the prediction; the
    figures of the prediction's window are recomputed with them."""

    authentication_classes = [
        ApiKeyAuthentication,
        authentication.SessionAuthentication,
        authentication.TokenAuthentication,
    ]
    permission_classes = [IsClientOrPersona]

    class OutputSerializer(serializers.Serializer):
        accepted = serializers.IntegerField()
        unknown = serializers.ListField(child=serializers.CharField())

    @extend_schema(request=FeedbackItemSerializer(many=True), responses=OutputSerializer)
    def post(self, request: Request) -> Response:
        data = request.data
        many = isinstance(data, list)
        if many and not data:
            raise serializers.ValidationError({"detail": "Send at least one {request_id, label}."})
        if many and len(data) > MAX_FEEDBACK_ITEMS:
            raise serializers.ValidationError(
                {"detail": f"At most {MAX_FEEDBACK_ITEMS} items per call."}
            )
        items = FeedbackItemSerializer(data=data, many=many)
        items.is_valid(raise_exception=True)
        validated = items.validated_data if many else [items.validated_data]
        user = request.user
        if isinstance(user, ApiKeyClient):
            endpoint_ids = user.endpoint_ids
        else:  # a persona labels only predictions of the endpoints they may see (team scoping)
            endpoint_ids = frozenset(endpoints_visible_to(user).values_list("pk", flat=True))
        result = services.feedback_record(
            items=[services.FeedbackItem(**item) for item in validated], endpoint_ids=endpoint_ids
        )
        return Response(self.OutputSerializer(result).data)


class EndpointMetricsApi(ApiView):
    """``GET /api/endpoints/<name>/metrics``: per-version figures, as on the dashboard."""

    class OutputSerializer(serializers.Serializer):
        version = serializers.IntegerField()
        requests = serializers.IntegerField()
        rows = serializers.IntegerField()
        labeled = serializers.IntegerField()
        label_coverage = serializers.FloatField(allow_null=True)
        accuracy = serializers.FloatField(allow_null=True)
        latency_p50_ms = serializers.FloatField(allow_null=True)
        latency_p95_ms = serializers.FloatField(allow_null=True)

    @extend_schema(responses=OutputSerializer(many=True))
    def get(self, request: Request, name: str) -> Response:
        endpoint = get_object_or_404(endpoints_visible_to(request.user), name=name)
        return Response(self.OutputSerializer(selectors.version_stats(endpoint), many=True).data)

"""Ground-truth intake and per-version figures over REST."""

from __future__ import annotations

import math

from django.shortcuts import get_object_or_404
from drf_spectacular.utils import extend_schema, extend_schema_field
from knox.auth import TokenAuthentication as KnoxTokenAuthentication
from rest_framework import authentication, permissions, serializers
from rest_framework.request import Request
from rest_framework.response import Response

from monitoring import selectors, services
from monitoring.queries import RangeQuery
from portal.api import ApiView
from portal.roles import user_roles
from rollouts.auth import ApiKeyAuthentication, ApiKeyClient
from rollouts.models import Deployment
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
    list of them (at most 10,000). Labels may arrive any time after the prediction, and a little
    before its row is logged (the log is buffered): those are kept as pending and matched when
    it is. A label must fit the version's output (400 naming the item otherwise); the figures
    of the prediction's window are recomputed with them."""

    authentication_classes = [
        ApiKeyAuthentication,
        authentication.SessionAuthentication,
        KnoxTokenAuthentication,
    ]
    permission_classes = [IsClientOrPersona]

    class OutputSerializer(serializers.Serializer):
        accepted = serializers.IntegerField(help_text="labels stored now")
        pending = serializers.IntegerField(
            help_text="labels kept for requests whose prediction is not logged yet; matched "
            "when it is, dropped after FEEDBACK_PENDING_TTL_S"
        )
        unknown = serializers.ListField(
            child=serializers.CharField(), help_text="the ids of the pending labels"
        )

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


class FiniteFloatField(serializers.FloatField):
    """A nullable float sent as null when it is NaN or infinite (strict JSON has neither)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("allow_null", True)
        super().__init__(**kwargs)

    def to_representation(self, value):
        value = float(value)
        return value if math.isfinite(value) else None


class TrafficSerializer(serializers.Serializer):
    """What a version served in a window or a range: counts, error rate, label coverage and
    latency percentiles (ms)."""

    requests = serializers.IntegerField()
    rows = serializers.IntegerField()
    errors = serializers.IntegerField()
    labeled = serializers.IntegerField()
    error_rate = FiniteFloatField()
    label_coverage = FiniteFloatField()
    latency_p50_ms = FiniteFloatField()
    latency_p95_ms = FiniteFloatField()
    latency_p99_ms = FiniteFloatField()


class MetricsWindowSerializer(TrafficSerializer):
    window_start = serializers.DateTimeField()
    accuracy = FiniteFloatField()
    rmse = FiniteFloatField()
    traffic_share = FiniteFloatField()


class ConfusionSerializer(serializers.Serializer):
    labels = serializers.ListField(child=serializers.CharField())
    matrix = serializers.ListField(
        child=serializers.ListField(child=serializers.IntegerField()),
        help_text="matrix[i][j]: rows labeled labels[i] and predicted labels[j]",
    )


class ClassFiguresSerializer(serializers.Serializer):
    label = serializers.CharField()
    precision = FiniteFloatField()
    recall = FiniteFloatField()
    f1 = FiniteFloatField()
    support = serializers.IntegerField(help_text="labeled rows of this class")


class VersionMetricsSerializer(TrafficSerializer):
    """Figures of one version over the range; a null figure has its reason in ``undefined``."""

    version = serializers.IntegerField()
    role = serializers.ChoiceField(choices=[*Deployment.Role.values, "not live"])
    traffic_weight = serializers.IntegerField(allow_null=True)
    task = serializers.CharField(help_text="classification or regression")
    window = serializers.SerializerMethodField()
    range_start = serializers.SerializerMethodField()
    accuracy = FiniteFloatField()
    precision = FiniteFloatField()
    recall = FiniteFloatField()
    f1 = FiniteFloatField()
    roc_auc = FiniteFloatField()
    rmse = FiniteFloatField()
    mae = FiniteFloatField()
    average = serializers.CharField(help_text="binary (positive class) or macro")
    per_class = ClassFiguresSerializer(
        many=True,
        help_text="classifiers: every class the version knows (and any label seen), even "
        "those absent from the range",
    )
    undefined = serializers.DictField(
        child=serializers.CharField(), help_text="why a figure is null"
    )
    confusion = serializers.SerializerMethodField()
    windows = serializers.SerializerMethodField()

    @extend_schema_field(serializers.ChoiceField(choices=list(selectors.WINDOWS)))
    def get_window(self, obj) -> str:
        return self.context["range"].window

    @extend_schema_field(serializers.DateTimeField())
    def get_range_start(self, obj):
        return serializers.DateTimeField().to_representation(self.context["range"].start)

    @extend_schema_field(ConfusionSerializer(allow_null=True))
    def get_confusion(self, obj):
        if obj.is_regression:
            return None
        return {"labels": obj.confusion_labels, "matrix": obj.confusion_matrix}

    @extend_schema_field(MetricsWindowSerializer(many=True))
    def get_windows(self, obj):
        points = self.context["series"].get(obj.version, [])
        return MetricsWindowSerializer(points, many=True).data


class EndpointMetricsApi(ApiView):
    """``GET /api/endpoints/<name>/metrics[?window=hour|day][&days=N]``: per-version figures
    over the range, as on the dashboard, read from rollups; each version also lists its figures
    per window. ``window`` and ``days`` default as on the dashboard (day windows when the data
    spans more than 3 days; 7 days of hours, 90 days of days); a bad value is a 400."""

    @extend_schema(parameters=[RangeQuery], responses=VersionMetricsSerializer(many=True))
    def get(self, request: Request, name: str) -> Response:
        endpoint = get_object_or_404(endpoints_visible_to(request.user), name=name)
        try:
            rng = selectors.range_from_query(endpoint, request.query_params)
        except selectors.BadQuery as exc:
            raise serializers.ValidationError({"detail": str(exc)}) from exc
        result = selectors.endpoint_figures(endpoint, rng)
        series: dict[int, list] = {}
        for point in result.series:
            series.setdefault(point.version, []).append(point)
        data = VersionMetricsSerializer(
            result.versions, many=True, context={"range": rng, "series": series}
        ).data
        return Response(data)

"""REST API of deployment requests and endpoints: one small view per operation, each calling the
same service as the HTML pages. Input serializers never accept status, reviewer or ownership."""

from __future__ import annotations

from django.http import Http404
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from registry.models import ModelVersion
from rollouts import selectors, services
from rollouts.models import DeploymentRequest, Environment, Strategy


class DeploymentRequestOut(serializers.Serializer):
    id = serializers.IntegerField()
    status = serializers.CharField()
    status_reason = serializers.CharField()
    model = serializers.CharField(source="model_version.registered_model.name")
    version = serializers.IntegerField(source="model_version.version")
    environment = serializers.CharField(source="endpoint.environment.name")
    endpoint = serializers.CharField(source="endpoint.name")
    strategy = serializers.CharField()
    justification = serializers.CharField()
    requester = serializers.CharField(source="requester.username")
    created_at = serializers.DateTimeField()
    decided_at = serializers.DateTimeField()
    live_at = serializers.DateTimeField()


class DeploymentRequestListApi(APIView):
    class InputSerializer(serializers.Serializer):
        model = serializers.CharField(max_length=255)
        version = serializers.IntegerField(min_value=1)
        environment = serializers.SlugRelatedField(slug_field="name", queryset=Environment.objects.all())
        strategy = serializers.ChoiceField(choices=Strategy.choices, default=Strategy.DIRECT)
        justification = serializers.CharField(max_length=4000)

    @extend_schema(responses=DeploymentRequestOut(many=True))
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
            mv = ModelVersion.objects.select_related("registered_model").get(
                registered_model__name=data.validated_data["model"], version=data.validated_data["version"]
            )
        except ModelVersion.DoesNotExist:
            raise serializers.ValidationError({"version": "No such model version; sync the registry first?"}) from None
        req = services.deployment_request_create(
            requester=request.user,
            model_version=mv,
            environment=data.validated_data["environment"],
            strategy=data.validated_data["strategy"],
            justification=data.validated_data["justification"],
        )
        return Response(DeploymentRequestOut(req).data, status=status.HTTP_201_CREATED)


def _visible(request: Request, request_id: int) -> DeploymentRequest:
    try:
        return selectors.deployment_request_detail(request.user, request_id)
    except DeploymentRequest.DoesNotExist:
        raise Http404 from None


class DeploymentRequestDetailApi(APIView):
    @extend_schema(responses=DeploymentRequestOut)
    def get(self, request: Request, request_id: int) -> Response:
        return Response(DeploymentRequestOut(_visible(request, request_id)).data)


class ReviewInput(serializers.Serializer):
    comment = serializers.CharField(max_length=4000, required=False, allow_blank=True, default="")


class DeploymentRequestApproveApi(APIView):
    @extend_schema(request=ReviewInput, responses=DeploymentRequestOut)
    def post(self, request: Request, request_id: int) -> Response:
        data = ReviewInput(data=request.data)
        data.is_valid(raise_exception=True)
        _visible(request, request_id)
        req = services.deployment_request_approve(
            request_id=request_id, reviewer=request.user, comment=data.validated_data["comment"]
        )
        return Response(DeploymentRequestOut(req).data)


class DeploymentRequestRejectApi(APIView):
    @extend_schema(request=ReviewInput, responses=DeploymentRequestOut)
    def post(self, request: Request, request_id: int) -> Response:
        data = ReviewInput(data=request.data)
        data.is_valid(raise_exception=True)
        _visible(request, request_id)
        req = services.deployment_request_reject(
            request_id=request_id, reviewer=request.user, comment=data.validated_data["comment"]
        )
        return Response(DeploymentRequestOut(req).data)


class DeploymentRequestCancelApi(APIView):
    @extend_schema(request=None, responses=DeploymentRequestOut)
    def post(self, request: Request, request_id: int) -> Response:
        _visible(request, request_id)
        req = services.deployment_request_cancel(request_id=request_id, actor=request.user)
        return Response(DeploymentRequestOut(req).data)


class EndpointListApi(APIView):
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

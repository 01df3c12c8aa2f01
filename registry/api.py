"""REST API of the registry mirror: the catalog, a model, a version, a comparison of two versions,
and "sync now". Reads go through ``registry.selectors``, so a data scientist of another team
gets 404 for a model they may not see."""

from __future__ import annotations

from django.core.exceptions import PermissionDenied
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.exceptions import ValidationError as DrfValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from portal.api import ApiView
from portal.queries import BadQuery, validated_query
from portal.roles import can_sync_registry
from portal.tasking import enqueue_on_commit
from registry import compare, selectors, tasks
from registry.models import ModelVersion, RegisteredModel
from registry.queries import CatalogQuery, VersionPairQuery


def _query(serializer_class, request: Request) -> dict:
    try:
        return validated_query(serializer_class, request.query_params)
    except BadQuery as exc:
        raise DrfValidationError({"detail": str(exc)}) from None


def _aliases_of(model: RegisteredModel, version: int) -> list[str]:
    return sorted(alias for alias, number in model.aliases.items() if int(number) == version)


class ModelListApi(ApiView):
    """``GET /api/models?q=&team=``: the registered models the user may see, by name."""

    class OutputSerializer(serializers.Serializer):
        name = serializers.CharField()
        team = serializers.CharField(source="team.slug", allow_null=True, default=None)
        description = serializers.CharField()
        aliases = serializers.DictField(child=serializers.IntegerField())
        version_count = serializers.IntegerField()
        latest_version = serializers.IntegerField(allow_null=True)
        synced_at = serializers.DateTimeField()

    @extend_schema(parameters=[CatalogQuery], responses=OutputSerializer(many=True))
    def get(self, request: Request) -> Response:
        query = _query(CatalogQuery, request)
        models = selectors.registered_models_list(
            request.user, search=query.get("q", ""), team=query.get("team", "")
        )
        return Response(self.OutputSerializer(models, many=True).data)


class VersionSummaryOut(serializers.Serializer):
    version = serializers.IntegerField()
    status = serializers.CharField()
    run_id = serializers.CharField()
    aliases = serializers.ListField(child=serializers.CharField())
    metrics = serializers.DictField(child=serializers.FloatField())
    mlflow_created_at = serializers.DateTimeField(allow_null=True)
    deleted_at = serializers.DateTimeField(
        allow_null=True, help_text="when it was deleted in MLflow; null while it exists"
    )


class ModelDetailApi(ApiView):
    """``GET /api/models/<name>``: a registered model and its versions, newest first."""

    class OutputSerializer(serializers.Serializer):
        name = serializers.CharField()
        team = serializers.CharField(allow_null=True)
        description = serializers.CharField()
        tags = serializers.DictField(child=serializers.CharField())
        aliases = serializers.DictField(child=serializers.IntegerField())
        synced_at = serializers.DateTimeField()
        versions = VersionSummaryOut(many=True)

    @extend_schema(responses=OutputSerializer)
    def get(self, request: Request, name: str) -> Response:
        model = selectors.registered_models_visible_to(request.user).get(name=name)
        versions = [
            {
                "version": v.version,
                "status": v.status,
                "run_id": v.run_id,
                "aliases": _aliases_of(model, v.version),
                "metrics": v.metrics,
                "mlflow_created_at": v.mlflow_created_at,
                "deleted_at": v.deleted_at,
            }
            for v in model.versions.order_by("-version")
        ]
        row = {
            "name": model.name,
            "team": model.team.slug if model.team_id else None,
            "description": model.description,
            "tags": model.tags,
            "aliases": model.aliases,
            "synced_at": model.synced_at,
            "versions": versions,
        }
        return Response(self.OutputSerializer(row).data)


class ModelVersionOut(serializers.Serializer):
    model = serializers.CharField(source="registered_model.name")
    version = serializers.IntegerField()
    status = serializers.CharField()
    description = serializers.CharField()
    run_id = serializers.CharField()
    source = serializers.CharField()
    tags = serializers.DictField(child=serializers.CharField())
    flavors = serializers.JSONField()
    signature = serializers.JSONField(allow_null=True)
    input_example = serializers.JSONField(allow_null=True)
    metrics = serializers.DictField(child=serializers.FloatField())
    params = serializers.DictField(child=serializers.CharField())
    aliases = serializers.SerializerMethodField()
    mlflow_created_at = serializers.DateTimeField(allow_null=True)
    synced_at = serializers.DateTimeField()
    deleted_at = serializers.DateTimeField(
        allow_null=True, help_text="when it was deleted in MLflow; null while it exists"
    )

    def get_aliases(self, mv: ModelVersion) -> list[str]:
        return _aliases_of(mv.registered_model, mv.version)


class ModelVersionDetailApi(ApiView):
    """``GET /api/models/<name>/versions/<n>``: one version with its signature, input example,
    metrics and params."""

    @extend_schema(responses=ModelVersionOut)
    def get(self, request: Request, name: str, version: int) -> Response:
        mv = selectors.model_version_get(request.user, name=name, version=version)
        return Response(ModelVersionOut(mv).data)


class MetricDeltaOut(serializers.Serializer):
    name = serializers.CharField()
    a = serializers.FloatField(allow_null=True, source="champion")
    b = serializers.FloatField(allow_null=True, source="candidate")
    delta = serializers.FloatField(allow_null=True)


class ParamDiffOut(serializers.Serializer):
    name = serializers.CharField()
    a = serializers.CharField(allow_null=True)
    b = serializers.CharField(allow_null=True)
    differs = serializers.BooleanField()


class ColumnChangeOut(serializers.Serializer):
    name = serializers.CharField()
    change = serializers.ChoiceField(choices=["added", "removed", "type", "required"])
    old = serializers.CharField(allow_null=True)
    new = serializers.CharField(allow_null=True)
    breaking = serializers.BooleanField()


class SignatureDiffOut(serializers.Serializer):
    compatible = serializers.BooleanField(help_text="clients of a can call b unchanged")
    outputs_changed = serializers.BooleanField()
    changes = ColumnChangeOut(many=True)


class ModelCompareApi(ApiView):
    """``GET /api/models/<name>/compare?a=1&b=2``: how version ``b`` differs from ``a`` (by
    default the two latest): metric deltas (b - a), params, and the signature diff."""

    class OutputSerializer(serializers.Serializer):
        model = serializers.CharField()
        a = serializers.IntegerField()
        b = serializers.IntegerField()
        metrics = MetricDeltaOut(many=True)
        params = ParamDiffOut(many=True)
        signature = SignatureDiffOut()

    @extend_schema(parameters=[VersionPairQuery], responses=OutputSerializer)
    def get(self, request: Request, name: str) -> Response:
        query = _query(VersionPairQuery, request)
        model = selectors.registered_models_visible_to(request.user).get(name=name)
        by_number = {v.version: v for v in model.versions.all()}
        latest = sorted(by_number, reverse=True)
        a = query.get("a") or (latest[1] if len(latest) > 1 else 0)
        b = query.get("b") or (latest[0] if latest else 0)
        for number in (a, b):
            if number not in by_number:
                raise NotFound(f"{name} has no version {number}.")
        old, new = by_number[a], by_number[b]
        params = compare.param_rows(old.params, new.params)
        row = {
            "model": model.name,
            "a": a,
            "b": b,
            # metric_rows(candidate, champion): b is the candidate, a the champion.
            "metrics": compare.metric_rows(new.metrics, old.metrics),
            "params": [{"name": k, "a": va, "b": vb, "differs": d} for k, va, vb, d in params],
            "signature": compare.signature_diff(old.signature, new.signature),
        }
        return Response(self.OutputSerializer(row).data)


class RegistrySyncApi(ApiView):
    """``POST /api/registry/sync``: mirror MLflow now, in a Celery task sent on commit (202)."""

    class OutputSerializer(serializers.Serializer):
        queued = serializers.BooleanField()

    @extend_schema(request=None, responses={202: OutputSerializer})
    def post(self, request: Request) -> Response:
        if not can_sync_registry(request.user):
            raise PermissionDenied("Only data scientists, reviewers and platform admins can sync.")
        user_id = request.user.pk
        enqueue_on_commit(tasks.sync_registry, user_id)
        return Response({"queued": True}, status=status.HTTP_202_ACCEPTED)

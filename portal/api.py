"""DRF glue shared by every app (the exception handler that maps domain errors to statuses, the
base view and the role permissions), and the portal's own API: teams and the audit trail."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.core.exceptions import ObjectDoesNotExist
from django.core.exceptions import PermissionDenied as DjangoPermissionDenied
from django.core.exceptions import ValidationError as DjangoValidationError
from django.shortcuts import get_object_or_404
from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import permissions, serializers, status
from rest_framework.exceptions import ValidationError as DrfValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView
from rest_framework.views import exception_handler as drf_exception_handler

from portal import selectors, services, views
from portal.errors import Conflict, ServiceUnavailable
from portal.models import AuditEvent, Team
from portal.queries import AuditFilterQuery, AuditPageQuery, BadQuery, validated_query
from portal.roles import is_platform_admin, user_roles


def exception_handler(exc, context):
    """DRF's handler, plus the domain errors: Conflict -> 409, Django ValidationError -> 400
    with field errors, PermissionDenied -> 403 with its message, DoesNotExist -> 404,
    ServiceUnavailable (MLflow) -> 503."""
    if isinstance(exc, Conflict):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"detail": exc.messages}
        return Response(detail, status=status.HTTP_400_BAD_REQUEST)
    if isinstance(exc, DjangoPermissionDenied):
        message = str(exc) or "You do not have permission to perform this action."
        return Response({"detail": message}, status=status.HTTP_403_FORBIDDEN)
    if isinstance(exc, ObjectDoesNotExist):
        return Response({"detail": "Not found."}, status=status.HTTP_404_NOT_FOUND)
    if isinstance(exc, ServiceUnavailable):
        return Response(
            {"detail": f"MLflow cannot be reached: {exc}"},
            status=status.HTTP_503_SERVICE_UNAVAILABLE,
        )
    return drf_exception_handler(exc, context)


class ErrorOut(serializers.Serializer):
    """The body of every 4xx and 5xx answer: ``{"detail": "..."}``, or for a body that fails
    validation one entry per field, ``{"<field>": ["message", ...]}``."""

    detail = serializers.CharField(required=False, help_text="what was wrong")


#: The error statuses an operation may answer, and when (see :meth:`ApiSchema.error_statuses`).
ERROR_DESCRIPTIONS = {
    "400": "Bad input: a field, query parameter or body that fails validation (NUL characters, "
    "JSON nested deeper than API_JSON_MAX_DEPTH, numbers out of range).",
    "401": "Not authenticated (a token that is unknown, expired or revoked).",
    "403": "Not allowed: not signed in, or a role or team that may not do this.",
    "404": "Not found, or not visible to this user.",
    "409": "Conflict with the current state (a transition the object's status forbids).",
    "415": "Unsupported media type of the body.",
}


class ApiSchema(AutoSchema):
    """Names a view's nested serializers after the view in the OpenAPI components
    (``TeamListApi.InputSerializer`` -> ``TeamListInput``), so that the many nested
    ``InputSerializer`` and ``OutputSerializer`` classes do not clash; and documents each
    operation's error statuses with the shared :class:`ErrorOut` body."""

    def error_statuses(self) -> list[str]:
        """400, 401 and 403 for every operation (any query may be refused, every route needs
        a user or a key); 404 when the path names an object; 409 and 415 for writes."""
        codes = ["400", "401", "403"]
        if "{" in self.path:
            codes.append("404")
        if self.method in ("POST", "PUT", "PATCH", "DELETE"):
            codes += ["409", "415"]
        return codes

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        for code in self.error_statuses():
            if code not in responses:
                body = self._get_response_for_code(ErrorOut, code, direction=direction)
                body["description"] = ERROR_DESCRIPTIONS[code]
                responses[code] = body
        return responses

    def get_serializer_name(self, serializer, direction):
        outer, _, inner = type(serializer).__qualname__.rpartition(".")
        if not outer:
            return super().get_serializer_name(serializer, direction)
        return outer.rpartition(".")[2].removesuffix("Api") + inner.removesuffix("Serializer")


class ApiView(APIView):
    """Base of every Rollgate API view: authenticated (session or ``Authorization: Token``, from
    the settings) and named in the schema by :class:`ApiSchema`."""

    schema = ApiSchema()


class HasRole(permissions.BasePermission):
    """A signed-in user who holds a Rollgate role (as the audit trail pages require)."""

    message = "This part of Rollgate is open to its personas only."

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_authenticated and user_roles(request.user))


class IsPlatformAdmin(permissions.BasePermission):
    """Platform admins only. Checked before the body is read, so that nobody else learns
    whether their input would have been valid; the services check again."""

    message = "Only platform admins can do this."

    def has_permission(self, request, view) -> bool:
        return bool(
            request.user and request.user.is_authenticated and is_platform_admin(request.user)
        )


# --- Teams ------------------------------------------------------------------------------------


class TeamOut(serializers.Serializer):
    name = serializers.CharField()
    slug = serializers.SlugField()
    members = serializers.SerializerMethodField()

    def get_members(self, team: Team) -> list[str]:
        return sorted(u.username for u in team.members.all())


class TeamListApi(ApiView):
    """``GET /api/teams``: every team for platform admins, the user's own teams for others.
    ``POST /api/teams`` (platform admins): ``{name, slug}``."""

    class InputSerializer(serializers.Serializer):
        name = serializers.CharField(max_length=100)
        slug = serializers.SlugField(max_length=100)

    def get_permissions(self):
        if self.request.method == "POST":
            return [permissions.IsAuthenticated(), IsPlatformAdmin()]
        return super().get_permissions()

    @extend_schema(responses=TeamOut(many=True))
    def get(self, request: Request) -> Response:
        teams = selectors.teams_visible_to(request.user).prefetch_related("members")
        return Response(TeamOut(teams, many=True).data)

    @extend_schema(request=InputSerializer, responses={201: TeamOut})
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        team = services.team_create(actor=request.user, **data.validated_data)
        return Response(TeamOut(team).data, status=status.HTTP_201_CREATED)


class TeamMemberApi(ApiView):
    """``POST`` / ``DELETE /api/teams/<slug>/members/<username>`` (platform admins)."""

    permission_classes = [permissions.IsAuthenticated, IsPlatformAdmin]

    def _objects(self, slug: str, username: str) -> tuple[Team, User]:
        return get_object_or_404(Team, slug=slug), get_object_or_404(User, username=username)

    @extend_schema(request=None, responses=TeamOut)
    def post(self, request: Request, slug: str, username: str) -> Response:
        team, user = self._objects(slug, username)
        team = services.team_add_member(actor=request.user, team=team, user=user)
        return Response(TeamOut(team).data)

    @extend_schema(request=None, responses={204: None})
    def delete(self, request: Request, slug: str, username: str) -> Response:
        team, user = self._objects(slug, username)
        services.team_remove_member(actor=request.user, team=team, user=user)
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Audit trail ------------------------------------------------------------------------------


class AuditEventOut(serializers.ModelSerializer):
    actor = serializers.CharField(source="actor_label")
    object = serializers.CharField(source="object_repr")

    class Meta:
        model = AuditEvent
        fields = [
            "id",
            "created_at",
            "actor",
            "action",
            "object_type",
            "object_id",
            "object",
            "registered_model",
            "environment",
            "before",
            "after",
            "prev_hash",
            "hash",
        ]


class AuditPagination(LimitOffsetPagination):
    default_limit = 50
    max_limit = 1000


class AuditListApi(ApiView):
    """``GET /api/audit``: the audit trail the user may see, newest first, filtered as on the
    page and paginated with ``limit`` (default 50, at most 1000) and ``offset``."""

    permission_classes = [permissions.IsAuthenticated, HasRole]

    class OutputSerializer(serializers.Serializer):
        count = serializers.IntegerField()
        next = serializers.URLField(allow_null=True)
        previous = serializers.URLField(allow_null=True)
        results = AuditEventOut(many=True)

    @extend_schema(
        operation_id="audit_list",
        parameters=[AuditPageQuery],
        responses=OutputSerializer,
    )
    def get(self, request: Request) -> Response:
        try:
            validated_query(AuditPageQuery, request.query_params)  # paging limits too
            filters = selectors.AuditFilters.from_query(request.query_params)
            events = selectors.audit_events_filtered(request.user, filters)
            paginator = AuditPagination()
            page = paginator.paginate_queryset(events, request, view=self)
        except (selectors.BadFilter, BadQuery) as exc:
            raise DrfValidationError({"detail": str(exc)}) from exc
        return paginator.get_paginated_response(AuditEventOut(page, many=True).data)


class CsvRenderer(BaseRenderer):
    """Lets a client ask for ``Accept: text/csv``; errors are written as ``key: value`` lines."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data, accepted_media_type=None, renderer_context=None):
        if isinstance(data, dict):
            return "\n".join(f"{key}: {value}" for key, value in data.items()).encode()
        return data


class AuditCsvApi(ApiView):
    """``GET /api/audit.csv``: the same selection as CSV, oldest first (as ``/audit/export.csv``,
    whose code it runs, but with token authentication too)."""

    permission_classes = [permissions.IsAuthenticated, HasRole]
    renderer_classes = [JSONRenderer, CsvRenderer]

    @extend_schema(
        operation_id="audit_csv",
        parameters=[AuditFilterQuery],
        responses={
            (200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="one row per event")
        },
    )
    def get(self, request: Request):
        # DRF has authenticated the user onto the underlying HttpRequest already.
        return views.audit_export(request._request)

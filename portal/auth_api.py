"""``/api/auth/``: API tokens for people. ``POST token`` trades a username and password for a
token (shown once; throttled, and locked out by django-axes after ``LOGIN_FAILURE_LIMIT``
failures per username and address), ``POST logout`` revokes the token used, ``POST logoutall``
every token of its user."""

from __future__ import annotations

from django.contrib.auth import authenticate
from drf_spectacular.utils import OpenApiResponse, extend_schema
from knox.auth import TokenAuthentication
from rest_framework import permissions, serializers, status
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import ScopedRateThrottle

from portal import tokens
from portal.api import ApiView, ErrorOut


class TokenLoginApi(ApiView):
    """``POST /api/auth/token`` ``{username, password}`` -> 200 ``{token, expiry}``; 400 when
    the credentials are wrong, 429 when throttled or locked out."""

    authentication_classes: list = []
    permission_classes = [permissions.AllowAny]
    throttle_classes = [ScopedRateThrottle]
    throttle_scope = "auth-token"

    class InputSerializer(serializers.Serializer):
        username = serializers.CharField(max_length=150)
        password = serializers.CharField(max_length=4096, trim_whitespace=False)

    class OutputSerializer(serializers.Serializer):
        token = serializers.CharField()
        expiry = serializers.DateTimeField(allow_null=True)

    @extend_schema(
        request=InputSerializer,
        responses={
            200: OutputSerializer,
            400: OpenApiResponse(ErrorOut, description="Wrong username or password."),
            429: OpenApiResponse(ErrorOut, description="Too many attempts."),
        },
    )
    def post(self, request: Request) -> Response:
        data = self.InputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        # The Django request, so that django-axes counts the failure and marks a lockout on it.
        user = authenticate(
            request._request,
            username=data.validated_data["username"],
            password=data.validated_data["password"],
        )
        if user is None or not user.is_active:
            return Response(
                {"detail": "Unable to log in with the credentials provided."},
                status=status.HTTP_400_BAD_REQUEST,
            )
        token, raw = tokens.api_token_create(user=user, actor=user)
        return Response(self.OutputSerializer({"token": raw, "expiry": token.expiry}).data)


class TokenLogoutApi(ApiView):
    """``POST /api/auth/logout``: revoke the token this request was made with (204)."""

    authentication_classes = [TokenAuthentication]
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(request=None, responses={204: None})
    def post(self, request: Request) -> Response:
        tokens.api_token_revoke(token=request.auth, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)


class TokenLogoutAllApi(ApiView):
    """``POST /api/auth/logoutall``: revoke every token of this request's user (204)."""

    authentication_classes = [TokenAuthentication]
    permission_classes = [permissions.IsAuthenticated]

    @extend_schema(request=None, responses={204: None})
    def post(self, request: Request) -> Response:
        tokens.api_token_revoke_all(user=request.user, actor=request.user)
        return Response(status=status.HTTP_204_NO_CONTENT)

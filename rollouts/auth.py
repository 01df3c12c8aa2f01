"""DRF authentication for client applications that hold a serving API key."""

from __future__ import annotations

from dataclasses import dataclass

from rest_framework import authentication, exceptions

from rollouts.models import ApiKey
from rollouts.services import api_key_hash


@dataclass(frozen=True)
class ApiKeyClient:
    """The principal of a request authenticated by an API key (not a person)."""

    api_key_id: int
    name: str
    endpoint_ids: frozenset[int]
    is_authenticated: bool = True
    is_anonymous: bool = False
    pk: None = None

    def get_username(self) -> str:
        return f"api-key:{self.name}"


class ApiKeyAuthentication(authentication.BaseAuthentication):
    """``Authorization: Bearer <api key>``; a revoked or unknown key is refused (401)."""

    keyword = "bearer"

    def authenticate(self, request):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != self.keyword:
            return None
        key = (
            ApiKey.objects.filter(key_hash=api_key_hash(token.strip()), revoked_at__isnull=True)
            .prefetch_related("endpoints")
            .first()
        )
        if key is None:
            raise exceptions.AuthenticationFailed("The API key is not valid or has been revoked.")
        client = ApiKeyClient(key.pk, key.name, frozenset(e.pk for e in key.endpoints.all()))
        return client, key

    def authenticate_header(self, request) -> str:
        return "Bearer"

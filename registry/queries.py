"""Query-string parameters of the registry's pages and API (see :mod:`portal.queries`)."""

from __future__ import annotations

from rest_framework import serializers

from portal.queries import INT_MAX


class CatalogQuery(serializers.Serializer):
    """``?q=&team=`` of the catalog page and ``GET /api/models``."""

    q = serializers.CharField(
        required=False, max_length=255, help_text="part of the name or description"
    )
    team = serializers.CharField(required=False, max_length=100, help_text="team slug")


class VersionPairQuery(serializers.Serializer):
    """``?a=&b=`` of the comparison page and API: version numbers, 1 to 2**31 - 1."""

    a = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=INT_MAX,
        help_text="the old version (default: second latest)",
    )
    b = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=INT_MAX,
        help_text="the new version (default: latest)",
    )

"""Query-string parameters of the portal's pages and API, validated with serializers that state
their limits (the API schema documents the same fields, so the limits appear there too).

A query serializer is given the query dict with blank values dropped (a filter form sends
``?since=`` for "no filter"); :func:`validated_query` raises :class:`BadQuery` whose message
lists each bad field with its allowed values, for a 400 on the page or the API.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import date

from rest_framework import serializers

#: Dates accepted in filters: far enough apart for any audit trail, near enough that a day
#: after the last one is still a date (9999-12-31 + 1 day overflows).
DATE_MIN = date(1970, 1, 1)
DATE_MAX = date(9998, 12, 31)
#: The largest value of a PostgreSQL ``integer`` column (version numbers, ids).
INT_MAX = 2**31 - 1


class BadQuery(ValueError):
    """A query parameter that cannot be honoured; the message names it and the allowed values."""


def validated_query(serializer_class: type[serializers.Serializer], params: Mapping) -> dict:
    """``serializer_class`` over ``params`` (a QueryDict or dict, blank values dropped).

    Returns the validated data. Raises :class:`BadQuery` with ``"field: message"`` parts.
    """
    data = {k: v.strip() for k, v in params.items() if isinstance(v, str) and v.strip()}
    query = serializer_class(data=data)
    if not query.is_valid():
        raise BadQuery(errors_text(query.errors))
    return dict(query.validated_data)


def errors_text(errors) -> str:
    parts = []
    for field, messages in errors.items():
        messages = messages if isinstance(messages, list) else [messages]
        text = " ".join(str(m) for m in messages)
        parts.append(text if field == "non_field_errors" else f"{field}: {text}")
    return "; ".join(parts)


class BoundedDateField(serializers.DateField):
    """A ``YYYY-MM-DD`` date from ``DATE_MIN`` to ``DATE_MAX``."""

    def __init__(self, **kwargs):
        kwargs.setdefault("required", False)
        kwargs.setdefault(
            "help_text", f"YYYY-MM-DD, from {DATE_MIN.isoformat()} to {DATE_MAX.isoformat()}"
        )
        super().__init__(input_formats=["%Y-%m-%d"], **kwargs)
        self.error_messages["invalid"] = (
            f"a date written YYYY-MM-DD, from {DATE_MIN.isoformat()} to {DATE_MAX.isoformat()}."
        )

    def to_internal_value(self, value):
        day = super().to_internal_value(value)
        if not DATE_MIN <= day <= DATE_MAX:
            self.fail("invalid")
        return day


class AuditFilterQuery(serializers.Serializer):
    """Filters of the audit trail (page, CSV export and API)."""

    model = serializers.CharField(required=False, max_length=255, help_text="registered model")
    environment = serializers.CharField(required=False, max_length=255)
    actor = serializers.CharField(required=False, max_length=150, help_text="or 'system'")
    action = serializers.CharField(required=False, max_length=100, help_text="request.approved")
    since = BoundedDateField(help_text="first day, inclusive (YYYY-MM-DD)")
    until = BoundedDateField(help_text="last day, inclusive (YYYY-MM-DD)")


class AuditPageQuery(AuditFilterQuery):
    """The audit API's filters and its paging."""

    limit = serializers.IntegerField(
        required=False, min_value=1, max_value=1000, help_text="events per page (default 50)"
    )
    offset = serializers.IntegerField(
        required=False, min_value=0, max_value=INT_MAX, help_text="events to skip"
    )

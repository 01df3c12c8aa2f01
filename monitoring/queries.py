"""Query-string parameters of the dashboards and the metrics API (see :mod:`portal.queries`)."""

from __future__ import annotations

from rest_framework import serializers

from monitoring.selectors import MAX_DAYS, WINDOWS

LONGEST = max(MAX_DAYS.values())
RANGE_TEXT = (
    f"days is a whole number from 1 to {LONGEST} ({MAX_DAYS['hour']} at most for hour windows)"
)


class RangeQuery(serializers.Serializer):
    """``?window=hour|day&days=N`` of the endpoint dashboard and ``/api/endpoints/<name>/metrics``:
    both optional (defaults in :func:`monitoring.selectors.dashboard_range`); days from 1 to 731,
    at most 31 with hour windows."""

    window = serializers.ChoiceField(
        choices=list(WINDOWS),
        required=False,
        error_messages={"invalid_choice": f"window must be one of {', '.join(WINDOWS)}."},
    )
    days = serializers.IntegerField(
        required=False,
        min_value=1,
        max_value=LONGEST,
        help_text=f"range in days: 1 to {LONGEST}, at most {MAX_DAYS['hour']} for hour windows",
        error_messages={
            "invalid": f"days must be a whole number; {RANGE_TEXT}.",
            "min_value": f"days must be at least 1; {RANGE_TEXT}.",
            "max_value": f"At most {LONGEST} days of day windows; {RANGE_TEXT}.",
            "max_string_length": f"days must be a whole number; {RANGE_TEXT}.",
        },
    )

    def validate(self, attrs):
        window, days = attrs.get("window"), attrs.get("days")
        if window == "hour" and days is not None and days > MAX_DAYS["hour"]:
            raise serializers.ValidationError(
                {
                    "days": f"At most {MAX_DAYS['hour']} days of hour windows (choose window=day "
                    f"for longer ranges, up to {LONGEST} days)."
                }
            )
        return attrs

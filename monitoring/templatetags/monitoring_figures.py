"""Display of dashboard figures: a number, or "undefined (reason)" when it is None."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

from django import template
from django.utils.html import format_html

register = template.Library()

_PERCENT = {"label_coverage", "error_rate", "change_failure_rate", "share_drifted"}
_MS = {"latency_p50_ms", "latency_p95_ms", "latency_p99_ms"}
_GENERAL = {"rmse", "mae"}


def _format(name: str, value: float) -> str:
    if name in _PERCENT:
        return f"{value:.1%}"
    if name in _MS:
        return f"{value:.1f}"
    if name in _GENERAL:
        return f"{value:.4g}"
    return f"{value:.4f}"


@register.filter
def figure(obj: Any, name: str) -> str:
    """``obj.<name>`` formatted for its kind, or ``undefined (obj.undefined[name])``."""
    value = getattr(obj, name, None)
    if isinstance(value, timedelta):
        return duration(value)
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        reason = (getattr(obj, "undefined", None) or {}).get(name, "")
        return format_html(
            '<span class="muted" data-undefined="{}">undefined{}</span>',
            name,
            f" ({reason})" if reason else "",
        )
    return _format(name, float(value))


@register.filter
def percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


@register.filter
def duration(value: timedelta | None) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``4 min 10 s``."""
    if value is None:
        return "–"
    seconds = int(value.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {seconds} s"
    return f"{seconds} s"

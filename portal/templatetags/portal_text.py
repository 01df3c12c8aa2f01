"""Template filters of the portal's pages."""

from __future__ import annotations

import json

from django import template

register = template.Library()


@register.filter
def as_json(value) -> str:
    """``value`` as compact JSON text (as the audit CSV and API give it); '' for None."""
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)

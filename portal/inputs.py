"""Guards on raw input before it reaches a parser's recursion or the ORM (issue 9, point 2).

- :func:`loads_bounded` parses JSON whose nesting is at most ``settings.API_JSON_MAX_DEPTH``
  (64) and whose strings and object keys hold no NUL character (PostgreSQL text cannot store
  one, so it would end in a 500 at the first query that uses it).
- :func:`find_nul` names the first query parameter, path or form field that holds a NUL.

Every caller turns :class:`BadInput` into a 400 whose message is ``str(exc)``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from django.conf import settings

NUL = "\x00"


class BadInput(ValueError):
    """Input refused before it is used; the message says why (for a 400)."""


def max_depth() -> int:
    return int(getattr(settings, "API_JSON_MAX_DEPTH", 64))


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads_bounded(data: bytes | str, *, limit: int | None = None, strict: bool = False):
    """``json.loads(data)`` with two bounds.

    Returns the parsed value. Raises :class:`BadInput` when the text is not JSON (or not
    UTF-8), when arrays and objects nest deeper than ``limit`` (default
    ``API_JSON_MAX_DEPTH``; a scalar is depth 0, ``[]`` depth 1), or when a string or key holds
    a NUL (``\\u0000``), or (``strict``) when it holds ``NaN`` or ``Infinity``. Parsing a
    very deep document exhausts the C parser's recursion before our walk sees it: that
    RecursionError is the same refusal.
    """
    limit = max_depth() if limit is None else limit
    try:
        value = json.loads(data, parse_constant=_refuse_constant if strict else None)
    except RecursionError:
        raise BadInput(f"JSON nested deeper than {limit} levels.") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many int digits
        raise BadInput(f"not JSON: {exc}") from None
    check_tree(value, limit=limit)
    return value


def check_tree(value, *, limit: int | None = None) -> None:
    """Walk a parsed JSON value iteratively (no recursion): nesting at most ``limit``, no NUL
    in any string or key. Raises :class:`BadInput`."""
    limit = max_depth() if limit is None else limit
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, str):
            if NUL in node:
                raise BadInput("JSON strings must not contain NUL (\\u0000) characters.")
        elif isinstance(node, dict | list):
            if depth + 1 > limit:
                raise BadInput(f"JSON nested deeper than {limit} levels.")
            if isinstance(node, dict):
                for key, child in node.items():
                    if NUL in key:
                        raise BadInput("JSON keys must not contain NUL (\\u0000) characters.")
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in node)


def find_nul(items: Iterable[tuple[str, Iterable[str]]]) -> str | None:
    """The name of the first ``(name, values)`` pair whose name or a value holds a NUL."""
    for name, values in items:
        if NUL in name or any(NUL in v for v in values if isinstance(v, str)):
            return name.replace(NUL, "\\x00")
    return None

"""Domain errors shared by every app, mapped to HTTP statuses in one place (portal.api)."""

from __future__ import annotations


class Conflict(Exception):
    """The object is not in a state that allows the action (HTTP 409)."""

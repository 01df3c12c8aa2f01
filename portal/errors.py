"""Domain errors shared by every app, mapped to HTTP statuses in one place (portal.api)."""

from __future__ import annotations


class Conflict(Exception):
    """The object is not in a state that allows the action (HTTP 409)."""


class ServiceUnavailable(Exception):
    """A system Rollgate depends on (MLflow) cannot be reached or refused (HTTP 503).

    Lower apps subclass it (``registry.mlflow_client.RegistryError``), so that the portal maps
    their failures without importing them.
    """

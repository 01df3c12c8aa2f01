"""Per-process serving state: the routing table (read from the database, trusted for
``SERVING_ROUTE_TTL_S``) and the model cache (each pinned version loaded once).

A routing change made by a rollout is therefore seen by every serving process, on any machine,
within the TTL, without a restart.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from registry import mlflow_client
from rollouts.models import Deployment, Endpoint


@dataclass(frozen=True)
class Route:
    deployment_id: int
    model_version_id: int
    model_name: str
    version: int
    weight: int
    signature: dict[str, Any] | None


@dataclass(frozen=True)
class EndpointRoutes:
    endpoint_id: int
    name: str
    routes: tuple[Route, ...]
    fetched_at: float

    def pick(self) -> Route:
        """One live route, chosen with probability proportional to its traffic weight."""
        if len(self.routes) == 1:
            return self.routes[0]
        return random.choices(self.routes, weights=[r.weight for r in self.routes])[0]


class Router:
    def __init__(self) -> None:
        self._table: dict[str, EndpointRoutes | None] = {}
        self._fetched: dict[str, float] = {}
        self._lock = threading.Lock()

    def get(self, endpoint_name: str) -> EndpointRoutes | None:
        """The live routes of an endpoint; None if no endpoint has that name."""
        now = time.monotonic()
        if now - self._fetched.get(endpoint_name, -1e9) < settings.SERVING_ROUTE_TTL_S:
            return self._table[endpoint_name]
        routes = self._load(endpoint_name, now)
        with self._lock:
            self._table[endpoint_name] = routes
            self._fetched[endpoint_name] = now
            live = {(r.model_name, r.version) for t in self._table.values() if t for r in t.routes}
        model_cache.retain(live)  # a version nothing routes to any more is evicted
        return routes

    def invalidate(self) -> None:
        with self._lock:
            self._fetched.clear()

    @staticmethod
    def _load(endpoint_name: str, now: float) -> EndpointRoutes | None:
        endpoint = Endpoint.objects.filter(name=endpoint_name).values_list("pk", flat=True).first()
        if endpoint is None:
            return None
        rows = (
            Deployment.objects.filter(
                endpoint_id=endpoint, status=Deployment.Status.LIVE, traffic_weight__gt=0
            )
            .order_by("pk")
            .values_list(
                "pk",
                "model_version_id",
                "model_version__registered_model__name",
                "model_version__version",
                "traffic_weight",
                "model_version__signature",
            )
        )
        return EndpointRoutes(endpoint, endpoint_name, tuple(Route(*row) for row in rows), now)


class ModelCache:
    """Loaded ``PyFuncModel`` objects keyed by (registered model, version)."""

    def __init__(self) -> None:
        self._models: dict[tuple[str, int], Any] = {}
        self._locks: dict[tuple[str, int], threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, model_name: str, version: int) -> Any:
        """Raises mlflow_client.RegistryError when the version cannot be loaded."""
        key = (model_name, version)
        model = self._models.get(key)
        if model is not None:
            return model
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:  # one load per version, however many requests wait for it
            model = self._models.get(key)
            if model is None:
                model = mlflow_client.load_pyfunc(model_name, version)
                self._models[key] = model
        return model

    def retain(self, keep: set[tuple[str, int]]) -> None:
        """Evict every version not in ``keep``."""
        with self._guard:
            for key in list(self._models):
                if key not in keep:
                    self._models.pop(key, None)


router = Router()
model_cache = ModelCache()

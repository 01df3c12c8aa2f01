"""Per-process serving state: the routing table and the API-key table (read from the database,
trusted for ``SERVING_ROUTE_TTL_S``), the model cache (each pinned version loaded once and
warmed before it takes traffic) and the micro-batcher.

A routing change made by a rollout, or a revoked key, is therefore seen by every serving
process, on any machine, within the TTL, without a restart.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from registry import mlflow_client
from rollouts.models import ApiKey, Deployment, Endpoint
from rollouts.serving.batching import LoopBatcher, MicroBatcher
from rollouts.serving.metrics import observe_batch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Route:
    deployment_id: int
    model_version_id: int
    model_name: str
    version: int
    weight: int
    signature: dict[str, Any] | None
    input_example: dict[str, Any] | None


@dataclass(frozen=True)
class EndpointRoutes:
    endpoint_id: int
    name: str
    max_body_bytes: int | None  # the endpoint's own limit; None: SERVING_MAX_BODY_BYTES
    routes: tuple[Route, ...]
    fetched_at: float

    def pick(self) -> Route:
        """One live route, chosen with probability proportional to its traffic weight."""
        if len(self.routes) == 1:
            return self.routes[0]
        return random.choices(self.routes, weights=[r.weight for r in self.routes])[0]


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

    def warm(self, route: Route) -> None:
        """Load the version and score its input example once, so that the first real request
        pays neither the load nor the first-call costs. Failures are logged, not raised: the
        request path reports them."""
        from rollouts.serving.schema import parse_request

        try:
            model = self.get(route.model_name, route.version)
            if route.input_example:
                parsed = parse_request(
                    json.dumps(route.input_example).encode(), "application/json", route.signature
                )
                model.predict(
                    parsed.frame, params=parsed.params
                ) if parsed.params else model.predict(parsed.frame)
        except Exception:  # noqa: BLE001 - a broken version must not break routing
            logger.exception("warming %s v%s failed", route.model_name, route.version)

    def peek(self, model_name: str, version: int) -> Any | None:
        """The loaded model, or None when it would have to be loaded first."""
        return self._models.get((model_name, version))

    def loaded(self) -> set[tuple[str, int]]:
        return set(self._models)

    def retain(self, keep: set[tuple[str, int]]) -> None:
        """Evict every version not in ``keep``."""
        with self._guard:
            for key in list(self._models):
                if key not in keep:
                    self._models.pop(key, None)
                    self._locks.pop(key, None)


class Router:
    def __init__(self) -> None:
        self._table: dict[str, EndpointRoutes | None] = {}
        self._fetched: dict[str, float] = {}
        self._lock = threading.Lock()
        self._refreshing = threading.Lock()

    def get(self, endpoint_name: str, max_age: float | None = None) -> EndpointRoutes | None:
        """The live routes of an endpoint; None if no endpoint has that name.

        When the cached entry is older than ``max_age`` seconds (default: the TTL) one thread
        refreshes it (warming any newly routed version first) while the others keep using the
        previous table.
        """
        now = time.monotonic()
        ttl = settings.SERVING_ROUTE_TTL_S if max_age is None else max_age
        fresh = now - self._fetched.get(endpoint_name, -1e9) < ttl
        if fresh:
            return self._table[endpoint_name]
        if endpoint_name in self._table and not self._refreshing.acquire(blocking=False):
            return self._table[endpoint_name]  # someone else is refreshing: serve the old table
        if endpoint_name not in self._table:
            self._refreshing.acquire()
        try:
            routes = self._load(endpoint_name, now)
            for route in routes.routes if routes else ():
                if (route.model_name, route.version) not in model_cache.loaded():
                    model_cache.warm(route)
            with self._lock:
                self._table[endpoint_name] = routes
                self._fetched[endpoint_name] = now
                live = {
                    (r.model_name, r.version) for t in self._table.values() if t for r in t.routes
                }
        finally:
            self._refreshing.release()
        model_cache.retain(live)  # a version nothing routes to any more is evicted
        batcher.retain(live)
        return routes

    def peek(self, endpoint_name: str) -> tuple[EndpointRoutes | None, float] | None:
        """Without touching the database: ``(routes, age in seconds)`` as :meth:`get` last
        loaded them (``routes`` None for an unknown endpoint), or None when the endpoint was
        never looked up in this process."""
        if endpoint_name not in self._table:
            return None
        age = time.monotonic() - self._fetched.get(endpoint_name, -1e9)
        return self._table.get(endpoint_name), age

    def invalidate(self) -> None:
        with self._lock:
            self._fetched.clear()
            self._table.clear()

    @staticmethod
    def _load(endpoint_name: str, now: float) -> EndpointRoutes | None:
        endpoint = (
            Endpoint.objects.filter(name=endpoint_name).values_list("pk", "max_body_bytes").first()
        )
        if endpoint is None:
            return None
        endpoint_id, max_body_bytes = endpoint
        rows = (
            Deployment.objects.filter(
                endpoint_id=endpoint_id, status=Deployment.Status.LIVE, traffic_weight__gt=0
            )
            .order_by("pk")
            .values_list(
                "pk",
                "model_version_id",
                "model_version__registered_model__name",
                "model_version__version",
                "traffic_weight",
                "model_version__signature",
                "model_version__input_example",
            )
        )
        return EndpointRoutes(
            endpoint_id, endpoint_name, max_body_bytes, tuple(Route(*row) for row in rows), now
        )


@dataclass(frozen=True)
class KeyGrant:
    key_id: int
    endpoint_ids: frozenset[int]
    rate_limit_per_minute: int | None


class KeyTable:
    """Live API keys by sha256, refreshed per key after the TTL (so a revocation takes effect
    within it)."""

    def __init__(self) -> None:
        self._grants: dict[str, tuple[float, KeyGrant | None]] = {}

    def get(self, key_hash: str, max_age: float | None = None) -> KeyGrant | None:
        """The grant of a live key, read again once older than ``max_age`` (default: TTL)."""
        now = time.monotonic()
        cached = self._grants.get(key_hash)
        ttl = settings.SERVING_ROUTE_TTL_S if max_age is None else max_age
        if cached is not None and now - cached[0] < ttl:
            return cached[1]
        key = (
            ApiKey.objects.filter(key_hash=key_hash, revoked_at__isnull=True)
            .values_list("pk", "rate_limit_per_minute")
            .first()
        )
        grant = None
        if key is not None:
            endpoints = ApiKey.endpoints.through.objects.filter(apikey_id=key[0]).values_list(
                "endpoint_id", flat=True
            )
            grant = KeyGrant(key[0], frozenset(endpoints), key[1])
        if len(self._grants) > 10_000:  # unknown keys must not grow the table without bound
            self._grants.clear()
        self._grants[key_hash] = (now, grant)
        return grant

    def peek(self, key_hash: str) -> tuple[KeyGrant | None, float] | None:
        """Without touching the database: ``(grant, age in seconds)`` as :meth:`get` last
        loaded it, or None when this key was never looked up in this process."""
        cached = self._grants.get(key_hash)
        if cached is None:
            return None
        return cached[1], time.monotonic() - cached[0]

    def invalidate(self) -> None:
        self._grants.clear()


model_cache = ModelCache()
batcher = MicroBatcher(
    max_wait_s=settings.SERVING_BATCH_MAX_WAIT_MS / 1000.0,
    max_rows=settings.SERVING_BATCH_MAX_ROWS,
    on_batch=observe_batch,
)
# The ASGI serving path batches in each worker's event loop instead (rollouts.serving.asgi).
loop_batcher = LoopBatcher(
    max_wait_s=settings.SERVING_BATCH_MAX_WAIT_MS / 1000.0,
    max_rows=settings.SERVING_BATCH_MAX_ROWS,
    on_batch=observe_batch,
)
router = Router()
keys = KeyTable()


def warm_all() -> list[str]:
    """Load and warm every version that some endpoint routes to, before this process takes
    traffic (gunicorn's ``post_worker_init``). Returns the endpoints warmed."""
    names = list(
        Endpoint.objects.filter(deployments__status=Deployment.Status.LIVE)
        .values_list("name", flat=True)
        .distinct()
    )
    for name in names:
        router.get(name)
    return names

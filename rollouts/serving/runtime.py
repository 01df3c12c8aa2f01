"""Per-process serving state: the routing table and the API-key table (read from the database,
trusted for ``SERVING_ROUTE_TTL_S`` and never after), the model cache (each pinned version
loaded once and warmed before it takes traffic), the micro-batcher, and the refresher thread
that keeps the tables fresh.

An entry past its TTL is never used: the request that finds it reads it again (one read per
entry at a time, the other requests wait for it; a database failure is a 503, not the old
entry). The refresher re-reads every entry twice per TTL, and loads and warms a version before
any routing table that sends it traffic is swapped in, as well as launching versions and
rollback targets, so requests seldom wait for either. A routing change made by a rollout, or a
revoked key, is therefore seen by every serving process, on any machine, within the TTL,
without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.db.models import OuterRef, Q, Subquery

from registry import mlflow_client
from rollouts.models import ApiKey, Deployment, DeploymentRequest, Endpoint
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


class LookupUnavailable(Exception):
    """A routing or key entry is past its TTL and the database could not be read again. The
    request is answered 503; the old entry is never used past its TTL."""


_STRIPES = 64  # refresh locks: one refresh per name (endpoint, key hash) at a time
MAX_ENTRIES = 10_000  # unknown endpoint names and keys must not grow a table without bound


def _read(load: Any, *args: Any) -> Any:
    try:
        return load(*args)
    except DatabaseError as exc:
        logger.warning("serving lookup failed: %s", exc)
        raise LookupUnavailable(str(exc)) from exc


def _stripe(locks: list[threading.Lock], name: str) -> threading.Lock:
    return locks[hash(name) % len(locks)]


class Router:
    """The routing table of this process: per endpoint name, ``(read at, routes)``.

    An entry is trusted for ``SERVING_ROUTE_TTL_S`` seconds from the moment its database read
    began, and never after: a request that finds it older reads it again itself (one read per
    endpoint at a time; the others wait for that read and use it), and a failed read raises
    :class:`LookupUnavailable`. The process's :class:`Refresher` re-reads every entry twice per
    TTL, loading and warming newly routed versions first, so requests rarely wait.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, EndpointRoutes | None]] = {}
        self._lock = threading.Lock()
        self._refreshing = [threading.Lock() for _ in range(_STRIPES)]

    def get(self, endpoint_name: str, max_age: float | None = None) -> EndpointRoutes | None:
        """The live routes of an endpoint (None if no endpoint has that name), read at most
        ``max_age`` seconds ago (default: the TTL).

        Raises:
            LookupUnavailable: the entry had to be read again and the database failed.
        """
        now = time.monotonic()
        ttl = settings.SERVING_ROUTE_TTL_S if max_age is None else max_age
        entry = self._entries.get(endpoint_name)
        if entry is not None and now - entry[0] < ttl:
            return entry[1]
        return self.refresh(endpoint_name, asked_at=now)

    def refresh(self, endpoint_name: str, asked_at: float | None = None) -> EndpointRoutes | None:
        """Read the endpoint's routes from the database, unless another thread did so after
        ``asked_at`` (monotonic seconds; default now) while this one waited for it."""
        asked_at = time.monotonic() if asked_at is None else asked_at
        with _stripe(self._refreshing, endpoint_name):
            entry = self._entries.get(endpoint_name)
            if entry is not None and entry[0] >= asked_at:
                return entry[1]
            started = time.monotonic()
            routes = _read(self._load, endpoint_name, started)
            self._store(endpoint_name, started, routes)
        return routes

    def refresh_warm(self, endpoint_name: str) -> EndpointRoutes | None:
        """The refresher's read: a version the new routes send traffic to that this process
        has not loaded is loaded and warmed first, while requests keep the current entry (only
        as long as it is within its TTL: past it they read and load themselves)."""
        started = time.monotonic()
        routes = _read(self._load, endpoint_name, started)
        cold = [
            r
            for r in (routes.routes if routes else ())
            if model_cache.peek(r.model_name, r.version) is None
        ]
        if cold:
            for route in cold:
                model_cache.warm(route)
            return self.refresh(endpoint_name)  # warming took a while: read again
        self._store(endpoint_name, started, routes)
        return routes

    def _store(self, endpoint_name: str, read_at: float, routes: EndpointRoutes | None) -> None:
        with self._lock:
            entry = self._entries.get(endpoint_name)
            if entry is not None and entry[0] >= read_at:
                return  # a newer read was stored meanwhile
            if entry is None and len(self._entries) >= MAX_ENTRIES:
                self._entries.clear()
            self._entries[endpoint_name] = (read_at, routes)

    def peek(self, endpoint_name: str) -> tuple[EndpointRoutes | None, float] | None:
        """Without touching the database: ``(routes, age in seconds)`` as last read (``routes``
        None for an unknown endpoint), or None when the endpoint was never looked up in this
        process. The caller must not use routes whose age is past the TTL."""
        entry = self._entries.get(endpoint_name)
        if entry is None:
            return None
        return entry[1], time.monotonic() - entry[0]

    def known(self) -> set[str]:
        """Names of the existing endpoints this process has looked up."""
        return {name for name, (_, routes) in list(self._entries.items()) if routes is not None}

    def retain(self, standby: set[tuple[str, int]]) -> None:
        """Evict every loaded version that no entry routes to and that is not in ``standby``
        (launching versions and rollback targets, kept warm for their turn)."""
        keep = set(standby)
        for _, routes in list(self._entries.values()):
            keep.update((r.model_name, r.version) for r in (routes.routes if routes else ()))
        model_cache.retain(keep)
        batcher.retain(keep)

    def invalidate(self) -> None:
        with self._lock:
            self._entries.clear()

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
            .values_list(*_ROUTE_FIELDS)
        )
        return EndpointRoutes(
            endpoint_id, endpoint_name, max_body_bytes, tuple(Route(*row) for row in rows), now
        )


_ROUTE_FIELDS = (
    "pk",
    "model_version_id",
    "model_version__registered_model__name",
    "model_version__version",
    "traffic_weight",
    "model_version__signature",
    "model_version__input_example",
)


def standby_routes() -> list[Route]:
    """Versions that may take traffic without notice, so every serving process keeps them
    loaded and warm: launching deployments (smoke-tested before they go live) and each
    endpoint's rollback target (the release its live one superseded)."""
    target = (
        Deployment.objects.filter(
            endpoint_id=OuterRef("endpoint_id"),
            status=Deployment.Status.RETIRED,
            request__status=DeploymentRequest.Status.SUPERSEDED,
        )
        .exclude(model_version_id=OuterRef("model_version_id"))
        .order_by("-retired_at")
        .values("pk")[:1]
    )
    targets = {
        pk
        for pk in Deployment.objects.filter(status=Deployment.Status.LIVE)
        .annotate(target=Subquery(target))
        .values_list("target", flat=True)
        if pk is not None
    }
    rows = (
        Deployment.objects.filter(Q(status=Deployment.Status.LAUNCHING) | Q(pk__in=targets))
        .order_by("pk")
        .values_list(*_ROUTE_FIELDS)
    )
    return [Route(*row) for row in rows]


@dataclass(frozen=True)
class KeyGrant:
    key_id: int
    endpoint_ids: frozenset[int]
    rate_limit_per_minute: int | None


class KeyTable:
    """Live API keys by sha256: per key, ``(read at, grant or None)``, trusted for the TTL and
    never after, as the :class:`Router`'s entries (so a revocation takes effect within it)."""

    def __init__(self) -> None:
        self._grants: dict[str, tuple[float, KeyGrant | None]] = {}
        self._lock = threading.Lock()
        self._refreshing = [threading.Lock() for _ in range(_STRIPES)]

    def get(self, key_hash: str, max_age: float | None = None) -> KeyGrant | None:
        """The grant of a live key (None: unknown or revoked), read at most ``max_age`` seconds
        ago (default: the TTL).

        Raises:
            LookupUnavailable: the entry had to be read again and the database failed.
        """
        now = time.monotonic()
        ttl = settings.SERVING_ROUTE_TTL_S if max_age is None else max_age
        cached = self._grants.get(key_hash)
        if cached is not None and now - cached[0] < ttl:
            return cached[1]
        with _stripe(self._refreshing, key_hash):
            cached = self._grants.get(key_hash)
            if cached is not None and cached[0] >= now:
                return cached[1]  # read by another request while this one waited
            started = time.monotonic()
            grants = _read(self._load, [key_hash])
            self._store(grants, started)
        return grants[key_hash]

    def refresh_all(self) -> int:
        """Read every key this process knows again (the refresher's cycle); returns how many."""
        started = time.monotonic()
        hashes = list(self._grants)
        for i in range(0, len(hashes), 500):
            self._store(_read(self._load, hashes[i : i + 500]), started)
        return len(hashes)

    def _store(self, grants: dict[str, KeyGrant | None], read_at: float) -> None:
        with self._lock:
            if len(self._grants) + len(grants) > MAX_ENTRIES:
                self._grants.clear()
            for key_hash, grant in grants.items():
                cached = self._grants.get(key_hash)
                if cached is None or cached[0] < read_at:
                    self._grants[key_hash] = (read_at, grant)

    @staticmethod
    def _load(hashes: list[str]) -> dict[str, KeyGrant | None]:
        rows = list(
            ApiKey.objects.filter(key_hash__in=hashes, revoked_at__isnull=True).values_list(
                "key_hash", "pk", "rate_limit_per_minute"
            )
        )
        scopes: dict[int, set[int]] = {pk: set() for _, pk, _ in rows}
        for key_id, endpoint_id in ApiKey.endpoints.through.objects.filter(
            apikey_id__in=scopes
        ).values_list("apikey_id", "endpoint_id"):
            scopes[key_id].add(endpoint_id)
        grants: dict[str, KeyGrant | None] = dict.fromkeys(hashes)
        for key_hash, pk, rate in rows:
            grants[key_hash] = KeyGrant(pk, frozenset(scopes[pk]), rate)
        return grants

    def peek(self, key_hash: str) -> tuple[KeyGrant | None, float] | None:
        """Without touching the database: ``(grant, age in seconds)`` as last read, or None
        when this key was never looked up in this process. The caller must not use a grant
        whose age is past the TTL."""
        cached = self._grants.get(key_hash)
        if cached is None:
            return None
        return cached[1], time.monotonic() - cached[0]

    def invalidate(self) -> None:
        with self._lock:
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


class Refresher:
    """One daemon thread per serving process that re-reads the routing and key tables every
    half TTL, so that requests find their entries within the TTL and rarely read the database
    themselves. Each cycle first loads and warms the standby versions (:func:`standby_routes`),
    then re-reads every endpoint (warming a newly routed version before its routes are swapped
    in) and every key this process knows, then evicts versions nothing needs any more.

    Started by gunicorn's ``post_worker_init`` and by the ASGI lifespan startup; ``start`` is
    idempotent per process (a forked child starts its own thread).
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> bool:
        """Start the thread unless it already runs in this process; True when started."""
        with self._guard:
            if self._pid == os.getpid() and self._thread is not None and self._thread.is_alive():
                return False
            self._pid = os.getpid()
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._run, args=(self._stop,), name="rollgate-refresher", daemon=True
            )
            self._thread.start()
            return True

    def stop(self) -> None:
        self._stop.set()

    def _run(self, stop: threading.Event) -> None:
        from django.db import connection

        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - requests past the TTL read (or 503) themselves
                logger.exception("refreshing the serving tables failed")
                connection.close()
            stop.wait(max(settings.SERVING_ROUTE_TTL_S / 2, 0.05))

    @staticmethod
    def run_once() -> list[str]:
        """One cycle; returns the endpoints re-read.

        Raises:
            LookupUnavailable: the database could not be read (the cycle stops there).
        """
        standby = _read(standby_routes)
        for route in standby:
            if model_cache.peek(route.model_name, route.version) is None:
                model_cache.warm(route)
        live = _read(
            lambda: set(
                Endpoint.objects.filter(deployments__status=Deployment.Status.LIVE)
                .values_list("name", flat=True)
                .distinct()
            )
        )
        names = sorted(live | router.known())
        for name in names:
            router.refresh_warm(name)
        keys.refresh_all()
        router.retain({(r.model_name, r.version) for r in standby})
        return names


refresher = Refresher()


def warm_all() -> list[str]:
    """Load and warm every version that some endpoint routes to, or may route to soon, before
    this process takes traffic (gunicorn's ``post_worker_init``). Returns the endpoints read."""
    return refresher.run_once()

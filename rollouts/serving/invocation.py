"""One scoring request, step by step, for any transport.

The Django view (:func:`rollouts.serving.views.invocations`, WSGI) and the ASGI fast path
(:mod:`rollouts.serving.asgi`) run the same steps, so both give the same statuses, messages,
headers, log rows and metrics; they differ only in how the body is read and how the batched
``predict`` is waited for:

1. :func:`admit` — method, endpoint (404), API key (401), rate limit (429), live version (503),
   declared size (413), ``X-Inference-Id`` (400), then the route picked by traffic weight.
2. :func:`load_model` — the picked version from the model cache (503 if it cannot be loaded).
3. the transport reads at most ``limit + 1`` bytes (:func:`too_large` past the limit), then
   :func:`parse` validates the body against the version's signature (400/415).
4. the transport scores the rows through its batcher; :func:`model_error` (422) if that raised,
   else :func:`scored` builds the 200 and the prediction-log rows.
5. :func:`finish` counts the answer in the metrics and, for an error answer on a known
   endpoint, adds its :class:`ServingError` row.

Each step returns either its result or an :class:`Answer` to send as is. Log rows are collected
on the :class:`Trace`; the transport hands them to the log buffer.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone

from registry.mlflow_client import RegistryError
from rollouts.models import PredictionLog, ServingError
from rollouts.services import api_key_hash
from rollouts.serving import throttle
from rollouts.serving.batching import positive_class_scorer
from rollouts.serving.metrics import observe
from rollouts.serving.runtime import (
    EndpointRoutes,
    KeyGrant,
    LookupUnavailable,
    Route,
    model_cache,
)
from rollouts.serving.schema import InputError, ParsedInput, column_specs, parse_request

logger = logging.getLogger(__name__)

INFERENCE_ID_MAX = 128
JSON_TYPE = "application/json"


@dataclass
class Answer:
    """An HTTP answer: status, JSON body, extra headers (name, value)."""

    status: int
    body: bytes
    headers: list[tuple[str, str]]
    error_code: str = ""


@dataclass
class Trace:
    """What one request learned on its way, for its metrics and log rows."""

    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    started: float = field(default_factory=time.perf_counter)
    endpoint_id: int | None = None
    model_version_id: int | None = None
    deployment_id: int | None = None
    rows: list[models.Model] = field(default_factory=list)


@dataclass(frozen=True)
class Meta:
    """What the transport knows of a request before its body: the method, the endpoint name
    from the path, and the headers that matter (as sent; '' when absent)."""

    method: str
    endpoint: str
    authorization: str
    content_type: str
    content_length: str
    inference_id: str
    client: str = ""  # the client's address, for the wrong-key throttle


@dataclass
class Admitted:
    routes: EndpointRoutes
    route: Route
    key: KeyGrant
    inference_id: str
    limit: int
    model: Any = None

    @property
    def model_headers(self) -> list[tuple[str, str]]:
        return [
            ("X-Model-Name", self.route.model_name),
            ("X-Model-Version", str(self.route.version)),
        ]

    @property
    def schema_enforced(self) -> bool:
        return column_specs(self.route.signature) is not None


class Lookups:
    """Where :func:`admit` reads the routing and key tables (the process caches, which read the
    database again once their entry is older than the TTL, and raise
    :class:`~rollouts.serving.runtime.LookupUnavailable` when that read fails)."""

    def routes(self, endpoint: str) -> EndpointRoutes | None:
        from rollouts.serving.runtime import router

        return router.get(endpoint)

    def key(self, key_hash: str) -> KeyGrant | None:
        from rollouts.serving.runtime import keys

        return keys.get(key_hash)

    def count_call(self, key: KeyGrant) -> tuple[int, float]:
        """Count one call of ``key`` in the current minute, in the database (shared by every
        process): (calls this minute, seconds until it ends)."""
        from django.db import DatabaseError

        from portal.counters import window_hit

        try:
            return window_hit(f"api-key:{key.key_id}", length_s=60)
        except DatabaseError as exc:
            raise LookupUnavailable(f"rate limit count failed: {exc}") from exc


BLOCKING = Lookups()


def error(
    status: int, code: str, message: str, trace: Trace, headers: list[tuple[str, str]] = ()
) -> Answer:
    body = json.dumps({"error_code": code, "message": message}).encode()
    return Answer(status, body, [("X-Request-Id", trace.request_id), *headers], code)


def _unauthenticated(message: str, trace: Trace) -> Answer:
    return error(401, "UNAUTHENTICATED", message, trace, [("WWW-Authenticate", "Bearer")])


def rate_limited(key: KeyGrant, lookups: Lookups) -> int | None:
    """Seconds until the key may call again, or None when within its per-minute limit.

    A fixed one-minute window counted in the database (:mod:`portal.counters`), so that the
    limit holds across every serving process and replica. Keys without a limit cost nothing."""
    if not key.rate_limit_per_minute:
        return None
    count, remaining = lookups.count_call(key)
    if count > key.rate_limit_per_minute:
        return max(1, math.ceil(remaining))
    return None


def _inference_id(raw: str) -> str | None:
    """The client's ``X-Inference-Id`` ('' when absent), or None when it is malformed."""
    value = raw.strip()
    if len(value) > INFERENCE_ID_MAX or not all(" " <= ch <= "~" for ch in value):
        return None
    return value


def unavailable(trace: Trace) -> Answer:
    """503: the routing or key table is past its TTL and the database cannot be read now."""
    return error(
        503,
        "TEMPORARILY_UNAVAILABLE",
        "Serving cannot check its routing or API keys right now; retry shortly.",
        trace,
        [("Retry-After", "1")],
    )


def admit(meta: Meta, trace: Trace, lookups: Lookups = BLOCKING) -> Admitted | Answer:
    """Everything decided before the body is read. ``lookups`` may raise (the ASGI path's
    cache-only lookups do, to be retried in a thread) only before the rate limit counts; a
    table that cannot be read fresh is a 503, never an answer from the old entry."""
    try:
        return _admit(meta, trace, lookups)
    except LookupUnavailable:
        return unavailable(trace)


def _admit(meta: Meta, trace: Trace, lookups: Lookups) -> Admitted | Answer:
    if meta.method != "POST":
        return error(405, "METHOD_NOT_ALLOWED", "Use POST.", trace, [("Allow", "POST")])
    routes = lookups.routes(meta.endpoint)
    if routes is None:
        return error(404, "RESOURCE_DOES_NOT_EXIST", f"No endpoint named {meta.endpoint!r}.", trace)
    trace.endpoint_id = routes.endpoint_id
    scheme, _, token = meta.authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _unauthenticated(
            "Send the endpoint's API key as 'Authorization: Bearer <key>'.", trace
        )
    if (retry_after := throttle.blocked(meta.client)) is not None:
        return error(
            429,
            "RATE_LIMITED",
            "Too many invalid API keys from this address; try again later.",
            trace,
            [("Retry-After", str(retry_after))],
        )
    key = lookups.key(api_key_hash(token.strip()))
    if key is None:
        throttle.count_failure(meta.client)
        return _unauthenticated("The API key is not valid or has been revoked.", trace)
    if routes.endpoint_id not in key.endpoint_ids:  # a valid key, out of its scope
        return error(
            403, "PERMISSION_DENIED", "The API key is not allowed to call this endpoint.", trace
        )
    if (retry_after := rate_limited(key, lookups)) is not None:
        return error(
            429,
            "RATE_LIMITED",
            f"This key may make {key.rate_limit_per_minute} requests per minute.",
            trace,
            [("Retry-After", str(retry_after))],
        )
    if not routes.routes:
        return error(
            503,
            "ENDPOINT_NOT_READY",
            f"Endpoint {meta.endpoint!r} has no live version yet.",
            trace,
        )
    limit = routes.max_body_bytes or settings.SERVING_MAX_BODY_BYTES
    try:
        declared = int(meta.content_length or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return too_large(limit, trace)
    inference_id = _inference_id(meta.inference_id)
    if inference_id is None:
        return error(
            400,
            "INVALID_PARAMETER_VALUE",
            f"The X-Inference-Id header must be at most {INFERENCE_ID_MAX} printable ASCII "
            "characters.",
            trace,
        )
    route = routes.pick()
    trace.model_version_id = route.model_version_id
    trace.deployment_id = route.deployment_id
    return Admitted(routes, route, key, inference_id, limit)


def too_large(limit: int, trace: Trace) -> Answer:
    return error(
        413,
        "REQUEST_TOO_LARGE",
        f"The body is over this endpoint's limit of {limit} bytes.",
        trace,
    )


def load_model(admitted: Admitted, trace: Trace) -> Answer | None:
    """Sets ``admitted.model``; the 503 answer when the version cannot be loaded."""
    route = admitted.route
    try:
        admitted.model = model_cache.get(route.model_name, route.version)
    except RegistryError:
        logger.exception("cannot load %s v%s", route.model_name, route.version)
        return error(
            503,
            "MODEL_UNAVAILABLE",
            "The live model version cannot be loaded right now.",
            trace,
            admitted.model_headers,
        )
    return None


def parse(admitted: Admitted, body: bytes, content_type: str, trace: Trace) -> ParsedInput | Answer:
    if len(body) > admitted.limit:
        return too_large(admitted.limit, trace)
    signature = admitted.route.signature
    try:
        return parse_request(
            body, content_type, signature, max_depth=settings.SERVING_JSON_MAX_DEPTH
        )
    except InputError as exc:
        answer = error(exc.status, exc.error_code, exc.message, trace, admitted.model_headers)
        if settings.SERVING_DEBUG_ERRORS and signature:
            answer.body = json.dumps(
                {
                    "error_code": exc.error_code,
                    "message": exc.message,
                    "schema": signature.get("inputs"),
                }
            ).encode()
        return answer


def model_error(admitted: Admitted, exc: Exception, trace: Trace) -> Answer:
    """The model rejected input that passed the signature checks: 422.

    The model's exception text often quotes the client's data or the model's internals
    (``could not convert string to float: '...'``), so it goes to the server log only, under
    the request id; the client gets a fixed message naming that id (``X-Request-Id`` too)."""
    route = admitted.route
    logger.warning(
        "predict failed on %s v%s, request %s",
        route.model_name,
        route.version,
        trace.request_id,
        exc_info=exc,
    )
    message = (
        "The model could not score this input. Check the values against the model's "
        f"signature; quote error id {trace.request_id} to its owners for the details."
    )
    return error(422, "MODEL_ERROR", message, trace, admitted.model_headers)


def internal_error(exc: BaseException, trace: Trace) -> Answer:
    """An unexpected failure on the serving path: 500 with a fixed message and the request id
    as error id; the exception and its traceback go to the server log under that id."""
    logger.error("scoring request %s failed", trace.request_id, exc_info=exc)
    message = f"Internal server error; quote error id {trace.request_id}."
    return error(500, "INTERNAL_ERROR", message, trace)


def scored(
    admitted: Admitted,
    parsed: ParsedInput,
    predictions: list[Any],
    scores: list[float] | None,
    trace: Trace,
) -> Answer:
    """The 200 answer; its prediction-log rows go on ``trace.rows``."""
    latency_ms = (time.perf_counter() - trace.started) * 1000
    records = parsed.records
    now = timezone.now()
    logged = predictions
    if len(logged) != len(records):  # e.g. a model that returns one value for the batch
        logged = [predictions] + [None] * (len(records) - 1)
    if scores is None or len(scores) != len(records):
        scores = [None] * len(records)
    route = admitted.route
    first = len(trace.rows)
    trace.rows.extend(
        PredictionLog(
            request_id=trace.request_id,
            row_index=i,
            endpoint_id=admitted.routes.endpoint_id,
            model_version_id=route.model_version_id,
            deployment_id=route.deployment_id,
            api_key_id=admitted.key.key_id,
            inference_id=admitted.inference_id,
            features=record,
            prediction=prediction,
            score=score,
            latency_ms=latency_ms,
            created_at=now,
        )
        for i, (record, prediction, score) in enumerate(zip(records, logged, scores, strict=True))
    )
    scorer = positive_class_scorer(admitted.model) if not parsed.params else None
    if scorer is not None:  # the log writer adds the positive-class scores, in bulk
        for row in trace.rows[first:]:
            row.scorer = scorer
    headers = [("X-Request-Id", trace.request_id), *admitted.model_headers]
    if admitted.inference_id:
        headers.append(("X-Inference-Id", admitted.inference_id))
    return Answer(200, json.dumps({"predictions": predictions}).encode(), headers)


def finish(meta: Meta, answer: Answer, trace: Trace) -> None:
    """Count the answer in the metrics; log an error answer on a known endpoint."""
    version = next((v for k, v in answer.headers if k == "X-Model-Version"), "")
    ok = answer.status == 200
    observe(
        meta.endpoint if answer.status != 404 else "",
        version,
        answer.status,
        time.perf_counter() - trace.started if ok else None,
    )
    if not ok and trace.endpoint_id is not None:
        trace.rows.append(
            ServingError(
                request_id=trace.request_id,
                endpoint_id=trace.endpoint_id,
                model_version_id=trace.model_version_id,
                deployment_id=trace.deployment_id,
                status_code=answer.status,
                error_code=answer.error_code[:64],
                created_at=timezone.now(),
            )
        )


def split_rows(rows: list[models.Model]) -> list[list[models.Model]]:
    """``rows`` grouped by model class, for :meth:`LogBuffer.append` (one class per call)."""
    groups: dict[type, list[models.Model]] = {}
    for row in rows:
        groups.setdefault(type(row), []).append(row)
    return list(groups.values())


LogSink = Callable[[list[models.Model]], None]

"""The scoring API: ``POST /serving/<endpoint>/invocations`` and ``GET /serving/<endpoint>/ping``.

Plain Django views rather than DRF: the protocol is MLflow's scoring server's, byte for byte,
and this is the hot path. Every response carries ``X-Request-Id``; a scored one also carries
``X-Model-Name`` and ``X-Model-Version``. Errors are ``{"error_code": ..., "message": ...}`` as
in MLflow. A client may name its request with ``X-Inference-Id`` (at most 128 printable ASCII
characters, as SageMaker's ``InferenceId``) and later send labels by that id instead of
``X-Request-Id``. Every error answer on a known endpoint is logged (:class:`ServingError`) for
the error rates that monitoring shows.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from registry.mlflow_client import RegistryError
from rollouts.models import PredictionLog, ServingError
from rollouts.services import api_key_hash
from rollouts.serving.logbuffer import log_buffer
from rollouts.serving.metrics import exposition, observe
from rollouts.serving.runtime import KeyGrant, batcher, keys, model_cache, router
from rollouts.serving.schema import InputError, column_specs, parse_request

logger = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, request_id: str, **headers: str) -> JsonResponse:
    response = JsonResponse({"error_code": code, "message": message}, status=status)
    response["X-Request-Id"] = request_id
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def _rate_limited(key: KeyGrant) -> int | None:
    """Seconds until the key may call again, or None when within its per-minute limit.

    A fixed one-minute window counted in Django's cache (Redis with ``CACHE_URL``, so shared by
    every replica; per process with the default local-memory cache)."""
    if not key.rate_limit_per_minute:
        return None
    now = time.time()
    window = int(now // 60)
    cache_key = f"rollgate:rate:{key.key_id}:{window}"
    if cache.add(cache_key, 1, timeout=61):
        count = 1
    else:
        try:
            count = cache.incr(cache_key)
        except ValueError:  # expired between add and incr
            cache.add(cache_key, 1, timeout=61)
            count = 1
    if count > key.rate_limit_per_minute:
        return max(1, int(60 - now % 60))
    return None


INFERENCE_ID_MAX = 128


@dataclass
class _Routed:
    """What one request learned about where it goes, for logging its error."""

    endpoint_id: int | None = None
    model_version_id: int | None = None


@csrf_exempt
def invocations(request: HttpRequest, endpoint: str) -> HttpResponse:
    started = time.perf_counter()
    request_id = str(uuid.uuid4())
    routed = _Routed()
    response = _invocations(request, endpoint, request_id, started, routed)
    version = response.get("X-Model-Version", "")
    scored = response.status_code == 200
    observe(
        endpoint if response.status_code != 404 else "",
        version,
        response.status_code,
        time.perf_counter() - started if scored else None,
    )
    if not scored and routed.endpoint_id is not None:
        log_buffer.append(
            [
                ServingError(
                    request_id=request_id,
                    endpoint_id=routed.endpoint_id,
                    model_version_id=routed.model_version_id,
                    status_code=response.status_code,
                    error_code=_error_code(response),
                    created_at=timezone.now(),
                )
            ]
        )
    return response


def _error_code(response: HttpResponse) -> str:
    try:
        return str(json.loads(response.content).get("error_code", ""))[:64]
    except (ValueError, AttributeError):
        return ""


def _inference_id(request: HttpRequest) -> str | None:
    """The client's ``X-Inference-Id`` ('' when absent), or None when it is malformed."""
    value = request.headers.get("X-Inference-Id", "").strip()
    if len(value) > INFERENCE_ID_MAX or not all(" " <= ch <= "~" for ch in value):
        return None
    return value


def _invocations(
    request: HttpRequest, endpoint: str, request_id: str, started: float, routed: _Routed
) -> HttpResponse:
    if request.method != "POST":
        response = _error(405, "METHOD_NOT_ALLOWED", "Use POST.", request_id)
        response["Allow"] = "POST"
        return response
    routes = router.get(endpoint)
    if routes is None:
        return _error(
            404, "RESOURCE_DOES_NOT_EXIST", f"No endpoint named {endpoint!r}.", request_id
        )
    routed.endpoint_id = routes.endpoint_id
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return _error(
            401,
            "UNAUTHENTICATED",
            "Send the endpoint's API key as 'Authorization: Bearer <key>'.",
            request_id,
            WWW_Authenticate="Bearer",
        )
    key = keys.get(api_key_hash(token.strip()))
    if key is None:
        return _error(
            401,
            "UNAUTHENTICATED",
            "The API key is not valid or has been revoked.",
            request_id,
            WWW_Authenticate="Bearer",
        )
    if routes.endpoint_id not in key.endpoint_ids:
        return _error(
            401,
            "UNAUTHENTICATED",
            "The API key is not allowed to call this endpoint.",
            request_id,
            WWW_Authenticate="Bearer",
        )
    if (retry_after := _rate_limited(key)) is not None:
        return _error(
            429,
            "RATE_LIMITED",
            f"This key may make {key.rate_limit_per_minute} requests per minute.",
            request_id,
            Retry_After=str(retry_after),
        )
    if not routes.routes:
        return _error(
            503, "ENDPOINT_NOT_READY", f"Endpoint {endpoint!r} has no live version yet.", request_id
        )
    limit = routes.max_body_bytes or settings.SERVING_MAX_BODY_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    too_large = f"The body is over this endpoint's limit of {limit} bytes."
    if declared > limit:
        return _error(413, "REQUEST_TOO_LARGE", too_large, request_id)

    inference_id = _inference_id(request)
    if inference_id is None:
        return _error(
            400,
            "INVALID_PARAMETER_VALUE",
            f"The X-Inference-Id header must be at most {INFERENCE_ID_MAX} printable ASCII "
            "characters.",
            request_id,
        )

    route = routes.pick()
    routed.model_version_id = route.model_version_id
    headers = {"X_Model_Name": route.model_name, "X_Model_Version": str(route.version)}
    try:
        model = model_cache.get(route.model_name, route.version)
    except RegistryError:
        logger.exception("cannot load %s v%s", route.model_name, route.version)
        return _error(
            503,
            "MODEL_UNAVAILABLE",
            "The live model version cannot be loaded right now.",
            request_id,
            **headers,
        )
    withdraw = batcher.announce(route.model_name, route.version, model)
    try:
        body = request.read(limit + 1)
        if len(body) > limit:
            return _error(413, "REQUEST_TOO_LARGE", too_large, request_id)
        try:
            parsed = parse_request(body, request.META.get("CONTENT_TYPE", ""), route.signature)
        except InputError as exc:
            response = _error(exc.status, exc.error_code, exc.message, request_id, **headers)
            if settings.SERVING_DEBUG_ERRORS and route.signature:
                response.content = json.dumps(
                    {
                        "error_code": exc.error_code,
                        "message": exc.message,
                        "schema": route.signature.get("inputs"),
                    }
                ).encode()
            return response
    finally:
        withdraw()
    try:
        predictions, scores = batcher.predict(
            route.model_name,
            route.version,
            model,
            parsed.columns,
            parsed.rows,
            parsed.params,
            schema_enforced=column_specs(route.signature) is not None,
        )
    except Exception as exc:  # the model rejected input that passed the signature checks
        logger.info("predict failed on %s v%s: %s", route.model_name, route.version, exc)
        message = f"The model could not score this input: {type(exc).__name__}: {str(exc)[:300]}"
        return _error(422, "MODEL_ERROR", message, request_id, **headers)

    latency_ms = (time.perf_counter() - started) * 1000
    _log_predictions(
        request_id,
        routes.endpoint_id,
        route.model_version_id,
        key.key_id,
        inference_id,
        parsed.records,
        predictions,
        scores,
        latency_ms,
    )
    response = HttpResponse(
        json.dumps({"predictions": predictions}), content_type="application/json"
    )
    response["X-Request-Id"] = request_id
    response["X-Model-Name"] = route.model_name
    response["X-Model-Version"] = str(route.version)
    if inference_id:
        response["X-Inference-Id"] = inference_id
    return response


def _log_predictions(
    request_id: str,
    endpoint_id: int,
    model_version_id: int,
    key_id: int,
    inference_id: str,
    records: list[dict[str, Any]],
    predictions: list[Any],
    scores: list[float] | None,
    latency_ms: float,
) -> None:
    now = timezone.now()
    if len(predictions) != len(records):  # e.g. a model that returns one value for the batch
        predictions = [predictions] + [None] * (len(records) - 1)
    if scores is None or len(scores) != len(records):
        scores = [None] * len(records)
    log_buffer.append(
        [
            PredictionLog(
                request_id=request_id,
                row_index=i,
                endpoint_id=endpoint_id,
                model_version_id=model_version_id,
                api_key_id=key_id,
                inference_id=inference_id,
                features=record,
                prediction=prediction,
                score=score,
                latency_ms=latency_ms,
                created_at=now,
            )
            for i, (record, prediction, score) in enumerate(
                zip(records, predictions, scores, strict=True)
            )
        ]
    )


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format: request counts, latencies, batch sizes, by endpoint and version."""
    body, content_type = exposition()
    return HttpResponse(body, content_type=content_type)


def ping(request: HttpRequest, endpoint: str) -> HttpResponse:
    """200 once the endpoint has a live version, 503 before, 404 for an unknown endpoint."""
    routes = router.get(endpoint)
    if routes is None:
        return JsonResponse(
            {
                "error_code": "RESOURCE_DOES_NOT_EXIST",
                "message": f"No endpoint named {endpoint!r}.",
            },
            status=404,
        )
    if not routes.routes:
        return JsonResponse({"status": "not ready", "message": "no live version"}, status=503)
    return JsonResponse(
        {
            "status": "ok",
            "versions": [
                {"model": r.model_name, "version": r.version, "weight": r.weight}
                for r in routes.routes
            ],
        }
    )


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def version(request: HttpRequest) -> HttpResponse:
    import mlflow.version

    return HttpResponse(mlflow.version.VERSION, content_type="text/plain")

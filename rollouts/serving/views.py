"""The scoring API: ``POST /serving/<endpoint>/invocations`` and ``GET /serving/<endpoint>/ping``.

Plain Django views rather than DRF: the protocol is MLflow's scoring server's, byte for byte,
and this is the hot path. Every response carries ``X-Request-Id``; a scored one also carries
``X-Model-Name`` and ``X-Model-Version``. Errors are ``{"error_code": ..., "message": ...}`` as
in MLflow.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from registry.mlflow_client import RegistryError
from rollouts.models import ApiKey, PredictionLog
from rollouts.serving.runtime import model_cache, router
from rollouts.serving.schema import InputError, parse_request, predictions_to_jsonable
from rollouts.services import api_key_hash

logger = logging.getLogger(__name__)


def _error(status: int, code: str, message: str, request_id: str, **headers: str) -> JsonResponse:
    response = JsonResponse({"error_code": code, "message": message}, status=status)
    response["X-Request-Id"] = request_id
    for name, value in headers.items():
        response[name.replace("_", "-")] = value
    return response


def authenticate_api_key(request: HttpRequest, endpoint_id: int) -> tuple[int | None, str | None]:
    """(key id, None) for a live key scoped to the endpoint, else (None, reason)."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None, "Send the endpoint's API key as 'Authorization: Bearer <key>'."
    key = (
        ApiKey.objects.filter(key_hash=api_key_hash(token.strip()), revoked_at__isnull=True)
        .values_list("pk", flat=True)
        .first()
    )
    if key is None:
        return None, "The API key is not valid or has been revoked."
    if not ApiKey.endpoints.through.objects.filter(apikey_id=key, endpoint_id=endpoint_id).exists():
        return None, "The API key is not allowed to call this endpoint."
    return key, None


@csrf_exempt
def invocations(request: HttpRequest, endpoint: str) -> HttpResponse:
    started = time.perf_counter()
    request_id = str(uuid.uuid4())
    if request.method != "POST":
        response = _error(405, "METHOD_NOT_ALLOWED", "Use POST.", request_id)
        response["Allow"] = "POST"
        return response
    routes = router.get(endpoint)
    if routes is None:
        return _error(404, "RESOURCE_DOES_NOT_EXIST", f"No endpoint named {endpoint!r}.", request_id)
    key_id, reason = authenticate_api_key(request, routes.endpoint_id)
    if key_id is None:
        return _error(401, "UNAUTHENTICATED", reason, request_id, WWW_Authenticate="Bearer")
    if not routes.routes:
        return _error(503, "ENDPOINT_NOT_READY", f"Endpoint {endpoint!r} has no live version yet.", request_id)
    limit = settings.SERVING_MAX_BODY_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit:
        return _error(413, "REQUEST_TOO_LARGE", f"The body is over this endpoint's limit of {limit} bytes.", request_id)
    body = request.read(limit + 1)
    if len(body) > limit:
        return _error(413, "REQUEST_TOO_LARGE", f"The body is over this endpoint's limit of {limit} bytes.", request_id)

    route = routes.pick()
    headers = {"X_Model_Name": route.model_name, "X_Model_Version": str(route.version)}
    try:
        parsed = parse_request(body, request.META.get("CONTENT_TYPE", ""), route.signature)
    except InputError as exc:
        return _error(exc.status, exc.error_code, exc.message, request_id, **headers)
    try:
        model = model_cache.get(route.model_name, route.version)
    except RegistryError:
        logger.exception("cannot load %s v%s", route.model_name, route.version)
        return _error(503, "MODEL_UNAVAILABLE", "The live model version cannot be loaded right now.", request_id, **headers)
    try:
        raw = model.predict(parsed.frame, params=parsed.params) if parsed.params else model.predict(parsed.frame)
        predictions = predictions_to_jsonable(raw)
    except Exception as exc:  # the model rejected input that passed the signature checks
        logger.info("predict failed on %s v%s: %s", route.model_name, route.version, exc)
        message = f"The model could not score this input: {type(exc).__name__}: {str(exc)[:300]}"
        return _error(422, "MODEL_ERROR", message, request_id, **headers)

    latency_ms = (time.perf_counter() - started) * 1000
    _log_predictions(request_id, routes.endpoint_id, route.model_version_id, key_id, parsed.records, predictions, latency_ms)
    response = JsonResponse({"predictions": predictions})
    response["X-Request-Id"] = request_id
    response["X-Model-Name"] = route.model_name
    response["X-Model-Version"] = str(route.version)
    return response


def _log_predictions(
    request_id: str,
    endpoint_id: int,
    model_version_id: int,
    key_id: int,
    records: list[dict[str, Any]],
    predictions: list[Any],
    latency_ms: float,
) -> None:
    now = timezone.now()
    if len(predictions) != len(records):  # e.g. a model that returns one value for the batch
        predictions = [predictions] + [None] * (len(records) - 1)
    PredictionLog.objects.bulk_create(
        PredictionLog(
            request_id=request_id,
            row_index=i,
            endpoint_id=endpoint_id,
            model_version_id=model_version_id,
            api_key_id=key_id,
            features=record,
            prediction=prediction,
            latency_ms=latency_ms,
            created_at=now,
        )
        for i, (record, prediction) in enumerate(zip(records, predictions, strict=True))
    )


def ping(request: HttpRequest, endpoint: str) -> HttpResponse:
    """200 once the endpoint has a live version, 503 before, 404 for an unknown endpoint."""
    routes = router.get(endpoint)
    if routes is None:
        return JsonResponse({"error_code": "RESOURCE_DOES_NOT_EXIST", "message": f"No endpoint named {endpoint!r}."}, status=404)
    if not routes.routes:
        return JsonResponse({"status": "not ready", "message": "no live version"}, status=503)
    return JsonResponse(
        {"status": "ok", "versions": [{"model": r.model_name, "version": r.version, "weight": r.weight} for r in routes.routes]}
    )


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def version(request: HttpRequest) -> HttpResponse:
    import mlflow.version

    return HttpResponse(mlflow.version.VERSION, content_type="text/plain")

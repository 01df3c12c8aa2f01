"""The scoring API: ``POST /serving/<endpoint>/invocations`` and ``GET /serving/<endpoint>/ping``.

Plain Django views rather than DRF: the protocol is MLflow's scoring server's, byte for byte.
The steps of a scoring request live in :mod:`rollouts.serving.invocation`, shared with the ASGI
fast path (:mod:`rollouts.serving.asgi`) that production serves them through.
Every response carries ``X-Request-Id``; a scored one also carries
``X-Model-Name`` and ``X-Model-Version``. Errors are ``{"error_code": ..., "message": ...}`` as
in MLflow. A client may name its request with ``X-Inference-Id`` (at most 128 printable ASCII
characters, as SageMaker's ``InferenceId``) and later send labels by that id instead of
``X-Request-Id``. Every error answer on a known endpoint is logged (:class:`ServingError`) for
the error rates that monitoring shows.
"""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from rollouts.services import api_key_hash
from rollouts.serving import invocation as inv
from rollouts.serving.logbuffer import log_buffer
from rollouts.serving.metrics import exposition
from rollouts.serving.runtime import (  # noqa: F401 - tests patch them
    LookupUnavailable,
    batcher,
    keys,
    model_cache,
    router,
)


def _response(answer: inv.Answer) -> HttpResponse:
    response = HttpResponse(answer.body, status=answer.status, content_type=inv.JSON_TYPE)
    for name, value in answer.headers:
        response[name] = value
    return response


@csrf_exempt
def invocations(request: HttpRequest, endpoint: str) -> HttpResponse:
    trace = inv.Trace()
    meta = inv.Meta(
        method=request.method or "",
        endpoint=endpoint,
        authorization=request.headers.get("Authorization", ""),
        content_type=request.META.get("CONTENT_TYPE", ""),
        content_length=request.META.get("CONTENT_LENGTH") or "",
        inference_id=request.headers.get("X-Inference-Id", ""),
        client=request.META.get("REMOTE_ADDR", ""),
    )
    try:
        answer = _invocations(request, meta, trace)
    except Exception as exc:  # noqa: BLE001 - a JSON 500 with an error id, as the ASGI path
        answer = inv.internal_error(exc, trace)
    _drain(request, settings.SERVING_DRAIN_MAX_BYTES)
    inv.finish(meta, answer, trace)
    for rows in inv.split_rows(trace.rows):
        log_buffer.append(rows)
    return _response(answer)


def _drain(request: HttpRequest, bound: int) -> None:
    """Read and discard what is left of the body, at most ``bound`` bytes, so that an answer
    given before the body was read (413, 401, ...) reaches a client that writes its whole
    body first; the WSGI server closes a connection left with more (see the ASGI path)."""
    drained = 0
    try:
        while drained <= bound and (chunk := request.read(64 * 1024)):
            drained += len(chunk)
    except OSError:  # the client went away; the answer is lost either way
        pass


def _invocations(request: HttpRequest, meta: inv.Meta, trace: inv.Trace) -> inv.Answer:
    admitted = inv.admit(meta, trace)
    if isinstance(admitted, inv.Answer):
        return admitted
    if failed := inv.load_model(admitted, trace):
        return failed
    route = admitted.route
    withdraw = batcher.announce(route.model_name, route.version, admitted.model)
    try:
        parsed = inv.parse(admitted, request.read(admitted.limit + 1), meta.content_type, trace)
    finally:
        withdraw()
    if isinstance(parsed, inv.Answer):
        return parsed
    try:
        predictions, scores = batcher.predict(
            route.model_name,
            route.version,
            admitted.model,
            parsed.columns,
            parsed.rows,
            parsed.params,
            schema_enforced=admitted.schema_enforced,
        )
    except Exception as exc:  # the model rejected input that passed the signature checks
        return inv.model_error(admitted, exc, trace)
    return inv.scored(admitted, parsed, predictions, scores, trace)


def _scrape_allowed(request: HttpRequest) -> bool:
    """A bearer ``METRICS_SCRAPE_TOKEN``, or a client address in ``METRICS_ALLOWED_NETWORKS``."""
    token = settings.METRICS_SCRAPE_TOKEN
    scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(sent.strip(), token):
        return True
    try:
        address = ipaddress.ip_address(request.META.get("REMOTE_ADDR", ""))
    except ValueError:
        return False
    return any(address in network for network in _allowed_networks())


def _allowed_networks() -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [
        ipaddress.ip_network(cidr.strip(), strict=False)
        for cidr in settings.METRICS_ALLOWED_NETWORKS
        if cidr.strip()
    ]


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text format: request counts, latencies, batch sizes, by endpoint and version.

    It names every team's models and versions, so only for a scraper that sends
    ``Authorization: Bearer <METRICS_SCRAPE_TOKEN>`` or calls from ``METRICS_ALLOWED_NETWORKS``
    (default the loopback addresses); 403 otherwise."""
    if not _scrape_allowed(request):
        return JsonResponse(
            {
                "error_code": "PERMISSION_DENIED",
                "message": "Send the scrape token as 'Authorization: Bearer <token>'.",
            },
            status=403,
        )
    body, content_type = exposition()
    return HttpResponse(body, content_type=content_type)


def ping(request: HttpRequest, endpoint: str) -> HttpResponse:
    """200 once the endpoint has a live version, 503 before (or while the routing table
    cannot be read fresh), 404 for an unknown endpoint.

    Only ``{"status": ...}`` without a key; the live versions and their weights only for a
    valid API key of this endpoint (``Authorization: Bearer <key>``)."""
    try:
        routes = router.get(endpoint)
    except LookupUnavailable:
        return JsonResponse(
            {"status": "unavailable", "message": "routing cannot be read right now"}, status=503
        )
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
    if not _key_of(request, routes.endpoint_id):
        return JsonResponse({"status": "ok"})
    return JsonResponse(
        {
            "status": "ok",
            "versions": [
                {"model": r.model_name, "version": r.version, "weight": r.weight}
                for r in routes.routes
            ],
        }
    )


def _key_of(request: HttpRequest, endpoint_id: int) -> bool:
    """Whether the request carries a valid API key allowed to call ``endpoint_id``."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    grant = keys.get(api_key_hash(token.strip()))
    return grant is not None and endpoint_id in grant.endpoint_ids


def health(request: HttpRequest) -> HttpResponse:
    return JsonResponse({"status": "ok"})


def version(request: HttpRequest) -> HttpResponse:
    import mlflow.version

    return HttpResponse(mlflow.version.VERSION, content_type="text/plain")

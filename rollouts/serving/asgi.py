"""The production entry point: an ASGI app that scores ``POST /serving/<endpoint>/invocations``
in the worker's event loop and hands every other request (pages, API, admin, static files,
``/metrics``, ``/serving/<endpoint>/ping``) to Django's ASGI handler.

Why: under gunicorn's threaded workers each scoring request crossed four threads (acceptor,
request thread, batcher, back) fighting for one GIL on two cores, and the tail latency came
from that convoy, not from the model (issue 4: p99 over 400 ms at 16 connections). Here one
thread per process does all of it. The steps and answers are those of the Django view
(:mod:`rollouts.serving.invocation`); only the waits differ:

- the routing and key tables are read from the process caches without a database call;
  when an entry is half a TTL old it is re-read in a background thread (so a change is seen
  within the TTL), and a never-seen endpoint or key is looked up in a thread while the loop
  serves others;
- a version that is not loaded yet is loaded in a thread;
- rows are scored by :class:`rollouts.serving.batching.LoopBatcher` in the loop;
- prediction-log rows go to the in-process buffer (its writer thread inserts them); with
  buffering off they are written in a thread.

Django's ORM refuses to run in an event loop, which is why every database touch above is
handed to ``run_blocking`` (a small thread pool; tests pass an inline runner).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.conf import settings
from django.db import close_old_connections

from rollouts.serving import invocation as inv
from rollouts.serving.logbuffer import log_buffer
from rollouts.serving.runtime import keys, loop_batcher, model_cache, router

logger = logging.getLogger(__name__)

INVOCATIONS = re.compile(r"/serving/([-a-zA-Z0-9_]+)/invocations")  # Django's <slug:endpoint>

Blocking = Callable[..., Awaitable[Any]]


class _NeedsLookup(Exception):
    """A table entry this process has never loaded: look it up in a thread."""


_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rollgate-lookup")


def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    finally:
        close_old_connections()  # a pool thread keeps no connection past CONN_MAX_AGE


async def run_in_pool(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_executor, _in_thread, fn, *args)


class _CachedLookups(inv.Lookups):
    def __init__(self, app: ServingApp) -> None:
        self.app = app

    def routes(self, endpoint: str):
        seen = router.peek(endpoint)
        if seen is None:
            raise _NeedsLookup
        routes, age = seen
        self.app.refresh_if_due(router.get, endpoint, age)
        for route in routes.routes if routes else ():
            if model_cache.peek(route.model_name, route.version) is None:
                raise _NeedsLookup  # loaded (or its failure reported) in a thread
        return routes

    def key(self, key_hash: str):
        seen = keys.peek(key_hash)
        if seen is None:
            raise _NeedsLookup
        grant, age = seen
        self.app.refresh_if_due(keys.get, key_hash, age)
        return grant


class ServingApp:
    """ASGI app: the scoring fast path in front of ``django_app``."""

    def __init__(self, django_app: Any, run_blocking: Blocking = run_in_pool) -> None:
        self.django_app = django_app
        self.run_blocking = run_blocking
        self.lookups = _CachedLookups(self)
        self._refreshing: set[tuple[str, str]] = set()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if match := INVOCATIONS.fullmatch(path):
                await self.invocations(scope, receive, send, match.group(1))
                return
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.django_app(scope, receive, send)

    def refresh_if_due(self, get: Callable[..., Any], name: str, age: float) -> None:
        """Re-read a routing or key entry in the background once it is half a TTL old, so
        requests never wait for the database and a change is seen within the TTL."""
        half = settings.SERVING_ROUTE_TTL_S / 2
        token = (get.__qualname__, name)
        if age < half or token in self._refreshing:
            return
        self._refreshing.add(token)

        async def refresh() -> None:
            try:
                await self.run_blocking(get, name, half)
            except Exception:  # noqa: BLE001 - the old entry serves until the next try
                logger.exception("refreshing %s failed", token)
            finally:
                self._refreshing.discard(token)

        asyncio.get_running_loop().create_task(refresh())

    async def invocations(self, scope: dict, receive: Callable, send: Callable, endpoint: str):
        trace = inv.Trace()
        headers: dict[str, str] = {}
        for name, value in scope["headers"]:
            key = name.decode("latin-1").lower()
            text = value.decode("latin-1")
            headers[key] = f"{headers[key]},{text}" if key in headers else text
        meta = inv.Meta(
            method=scope["method"],
            endpoint=endpoint,
            authorization=headers.get("authorization", ""),
            content_type=headers.get("content-type", ""),
            content_length=headers.get("content-length", ""),
            inference_id=headers.get("x-inference-id", ""),
            client=(scope.get("client") or ("",))[0] or "",
        )
        try:
            answer = await self._invocations(meta, receive, trace)
        except ConnectionAbortedError:
            return  # nobody to answer; nothing was scored
        except Exception:  # noqa: BLE001 - answered like Django's 500, never a reset connection
            logger.exception("scoring request %s failed", trace.request_id)
            answer = inv.error(500, "INTERNAL_ERROR", "Internal server error.", trace)
        inv.finish(meta, answer, trace)
        for rows in inv.split_rows(trace.rows):
            if settings.SERVING_LOG_BUFFERED:
                log_buffer.append(rows)
            else:
                await self.run_blocking(log_buffer.append, rows)
        response_headers = [
            (b"content-type", inv.JSON_TYPE.encode()),
            (b"content-length", str(len(answer.body)).encode()),
            (b"x-content-type-options", b"nosniff"),
            *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in answer.headers),
        ]
        await send(
            {"type": "http.response.start", "status": answer.status, "headers": response_headers}
        )
        await send({"type": "http.response.body", "body": answer.body})

    async def _invocations(self, meta: inv.Meta, receive: Callable, trace: inv.Trace):
        try:
            admitted = inv.admit(meta, trace, self.lookups)
        except _NeedsLookup:
            admitted = await self.run_blocking(inv.admit, meta, trace)
        if isinstance(admitted, inv.Answer):
            return admitted
        route = admitted.route
        admitted.model = model_cache.peek(route.model_name, route.version)
        if admitted.model is None and (
            failed := await self.run_blocking(inv.load_model, admitted, trace)
        ):
            return failed
        withdraw = loop_batcher.announce(route.model_name, route.version)
        try:
            body = await _read_body(receive, admitted.limit + 1)
            parsed = inv.parse(admitted, body, meta.content_type, trace)
        finally:
            withdraw()
        if isinstance(parsed, inv.Answer):
            return parsed
        try:
            predictions, scores = await loop_batcher.predict(
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

    @staticmethod
    async def _lifespan(receive: Callable, send: Callable) -> None:
        # Models are warmed by gunicorn's post_worker_init and the log is flushed by its
        # worker_exit (portal/gunicorn_conf.py); the protocol only needs its answers.
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _read_body(receive: Callable, at_most: int) -> bytes:
    """The request body, or its first ``at_most`` bytes when it is longer (the caller answers
    413 then: a lying or missing Content-Length is still cut off)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("the client went away")
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size >= at_most or not message.get("more_body"):
            return b"".join(chunks)[:at_most]

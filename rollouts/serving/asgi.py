"""The production entry point: an ASGI app that scores ``POST /serving/<endpoint>/invocations``
in the worker's event loop and hands every other request (pages, API, admin, static files,
``/metrics``, ``/serving/<endpoint>/ping``) to Django's ASGI handler.

Why: under gunicorn's threaded workers each scoring request crossed four threads (acceptor,
request thread, batcher, back) fighting for one GIL on two cores, and the tail latency came
from that convoy, not from the model (issue 4: p99 over 400 ms at 16 connections). Here one
thread per process does all of it. The steps and answers are those of the Django view
(:mod:`rollouts.serving.invocation`); only the waits differ:

- the routing and key tables are read from the process caches without a database call
  while their entry is within the TTL (the process's refresher thread, started at lifespan
  startup, re-reads them twice per TTL); a never-seen entry, or one past its TTL, is never
  used: it is read again in a thread while the loop serves others (503 if the database fails);
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
from rollouts.serving.logbuffer import drain_at_shutdown, log_buffer
from rollouts.serving.runtime import keys, loop_batcher, model_cache, refresher, router

logger = logging.getLogger(__name__)

INVOCATIONS = re.compile(r"/serving/([-a-zA-Z0-9_]+)/invocations")  # Django's <slug:endpoint>

Blocking = Callable[..., Awaitable[Any]]


class _NeedsLookup(Exception):
    """A table entry this process has never loaded, or one past its TTL: look it up in a
    thread (never answer from it)."""


_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="rollgate-lookup")


def _in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    finally:
        close_old_connections()  # a pool thread keeps no connection past CONN_MAX_AGE


async def run_in_pool(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_executor, _in_thread, fn, *args)


class _CachedLookups(inv.Lookups):
    """Lookups that never touch the database: an entry that is missing or past its TTL raises
    :class:`_NeedsLookup`, and the request is admitted again in a thread with blocking ones."""

    def routes(self, endpoint: str):
        seen = router.peek(endpoint)
        if seen is None or seen[1] >= settings.SERVING_ROUTE_TTL_S:
            raise _NeedsLookup
        routes = seen[0]
        for route in routes.routes if routes else ():
            if model_cache.peek(route.model_name, route.version) is None:
                raise _NeedsLookup  # loaded (or its failure reported) in a thread
        return routes

    def key(self, key_hash: str):
        seen = keys.peek(key_hash)
        if seen is None or seen[1] >= settings.SERVING_ROUTE_TTL_S:
            raise _NeedsLookup
        return seen[0]

    def count_call(self, key):
        raise _NeedsLookup  # the count is a database write: in a thread


class ServingApp:
    """ASGI app: the scoring fast path in front of ``django_app``."""

    def __init__(self, django_app: Any, run_blocking: Blocking = run_in_pool) -> None:
        self.django_app = django_app
        self.run_blocking = run_blocking
        self.lookups = _CachedLookups()

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
        body = _Body(receive)
        try:
            answer = await self._invocations(meta, body, trace)
        except ConnectionAbortedError:
            return  # nobody to answer; nothing was scored
        except Exception as exc:  # noqa: BLE001 - answered like Django's 500, never a reset
            answer = inv.internal_error(exc, trace)
        # An answer given before the whole body was read (413, 401, ...) must still reach a
        # client that writes all of its body before reading (urllib, many SDKs): closing with
        # unread data makes the kernel reset the connection, and that client sees a broken
        # pipe instead of the answer. So the rest is read and discarded, up to a bound.
        gone = False
        try:
            if not body.complete and not await body.drain(
                settings.SERVING_DRAIN_MAX_BYTES,
                declared=meta.content_length,
                expect_continue=_expects_continue(headers),
            ):
                answer.headers.append(("Connection", "close"))
        except ConnectionAbortedError:
            gone = True  # counted and logged below, but there is no one to answer
        inv.finish(meta, answer, trace)
        for rows in inv.split_rows(trace.rows):
            if settings.SERVING_LOG_BUFFERED:
                log_buffer.append(rows)
            else:
                await self.run_blocking(log_buffer.append, rows)
        if gone:
            return
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

    async def _invocations(self, meta: inv.Meta, body: _Body, trace: inv.Trace):
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
            parsed = inv.parse(
                admitted, await body.read(admitted.limit + 1), meta.content_type, trace
            )
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
        """Models are warmed by gunicorn's post_worker_init (portal/gunicorn_conf.py); the
        refresher thread starts here too (a no-op when post_worker_init started it), so that a
        server without gunicorn has one. At shutdown, once the server has answered its last
        request, the buffered prediction log is drained (in a thread: the ORM refuses the event
        loop): under uvicorn the process may end by its re-raised signal, where no exit hook
        runs (issue 9)."""
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                refresher.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                try:
                    await asyncio.to_thread(drain_at_shutdown, "lifespan shutdown")
                except Exception:  # noqa: BLE001 - the server must still finish shutting down
                    logger.exception("draining the prediction log at shutdown failed")
                await send({"type": "lifespan.shutdown.complete"})
                return


def _expects_continue(headers: dict[str, str]) -> bool:
    return headers.get("expect", "").strip().lower() == "100-continue"


class _Body:
    """The request body as ASGI ``receive`` gives it, read at most once.

    ``complete`` is True once the last chunk has been received."""

    def __init__(self, receive: Callable) -> None:
        self.receive = receive
        self.started = False
        self.complete = False
        self.received = 0  # bytes

    async def _chunk(self) -> bytes:
        self.started = True
        message = await self.receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError("the client went away")
        if not message.get("more_body"):
            self.complete = True
        chunk = message.get("body", b"")
        self.received += len(chunk)
        return chunk

    async def read(self, at_most: int) -> bytes:
        """The body, or its first ``at_most`` bytes when it is longer (the caller answers
        413 then: a lying or missing Content-Length is still cut off)."""
        chunks: list[bytes] = []
        size = 0
        while not self.complete and size < at_most:
            chunk = await self._chunk()
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)[:at_most]

    async def drain(self, bound: int, *, declared: str = "", expect_continue: bool = False) -> bool:
        """Read and discard the rest of the body, at most ``bound`` more bytes: True when it
        was read to its end (the connection may be kept), False when the caller should
        answer and close. Nothing is read when the ``declared`` Content-Length already says
        the rest is over the bound, or when the client waits for ``100 Continue`` (it has sent
        nothing yet and is answered without being asked for its body).

        Raises:
            ConnectionAbortedError: the client went away meanwhile.
        """
        if expect_continue and not self.started:
            return False
        try:
            if int(declared) - self.received > bound:
                return False
        except ValueError:
            pass  # chunked, or no usable length: read up to the bound
        drained = 0
        while not self.complete:
            if drained > bound:
                return False
            drained += len(await self._chunk())
        return True

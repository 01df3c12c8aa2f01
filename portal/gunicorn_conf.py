"""Gunicorn settings for the portal and its serving API (production and `make demo` alike):

    gunicorn portal.asgi:application -c portal/gunicorn_conf.py

``WEB_CONCURRENCY`` worker processes (default 2, about one per core), each an asyncio event
loop (uvicorn with uvloop and httptools) running :mod:`portal.asgi`: scoring requests are
parsed, batched and scored in the loop, the rest of the portal is Django's ASGI handler (its
sync views run in a worker thread). Each worker keeps its own model cache and routing table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading

from gunicorn.arbiter import Arbiter
from uvicorn.server import HANDLED_SIGNALS, Server
from uvicorn_worker import UvicornWorker

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8000')}"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))


# Request-head limits (bytes; fields is a count). gunicorn's own settings, which its uvicorn
# worker ignores, are applied by RollgateWorker through portal/http_limits.py, plus a bound on
# the whole head: a longer line gets 414, more or longer headers 431.
limit_request_line = int(os.environ.get("GUNICORN_LIMIT_REQUEST_LINE", "8190"))
limit_request_fields = int(os.environ.get("GUNICORN_LIMIT_REQUEST_FIELDS", "100"))
limit_request_field_size = int(os.environ.get("GUNICORN_LIMIT_REQUEST_FIELD_SIZE", "8190"))
LIMIT_REQUEST_HEAD = int(os.environ.get("GUNICORN_LIMIT_REQUEST_HEAD", str(64 * 1024)))


class RollgateServer(Server):
    """uvicorn's server, ending the way a gunicorn worker should (issue 9).

    - After its graceful shutdown (every request answered, lifespan shutdown sent), it drains
      the prediction log again: a forced exit (a second Ctrl-C) skips the lifespan, and an app
      without lifespan support never sees it.
    - It does not re-raise the stop signal it caught: uvicorn does so to die by that signal,
      which skips gunicorn's ``worker_exit`` hook (the drain, ``mark_process_dead``) and every
      ``atexit`` handler. The worker returns instead, gunicorn exits it with status 0, as its
      own workers do after a graceful stop.
    """

    async def shutdown(self, sockets=None) -> None:
        await super().shutdown(sockets=sockets)
        from rollouts.serving.logbuffer import drain_at_shutdown

        await asyncio.to_thread(drain_at_shutdown, "server shutdown")

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn's own, less the re-raise of the caught signals at the end.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in HANDLED_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


class RollgateWorker(UvicornWorker):
    """uvicorn's gunicorn worker, with its access log following gunicorn's ``accesslog``
    (uvicorn would otherwise format a line per request for a logger with no handler),
    gunicorn's request-head limits applied to uvicorn's parser, the
    :class:`RollgateServer` above, and a graceful shutdown bounded so that the drain of the
    prediction log still fits in gunicorn's ``graceful_timeout`` (after which the master
    SIGKILLs the worker)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config.access_log = bool(self.cfg.accesslog)
        from portal.http_limits import HeadLimits, LimitedHttpToolsProtocol

        self.config.head_limits = HeadLimits(
            line=self.cfg.limit_request_line or 2**31,  # 0: unlimited, as in gunicorn
            fields=self.cfg.limit_request_fields or 2**31,
            field_size=self.cfg.limit_request_field_size or 2**31,
            total=LIMIT_REQUEST_HEAD,
        )
        self.config.http = LimitedHttpToolsProtocol
        self.config.h11_max_incomplete_event_size = LIMIT_REQUEST_HEAD  # if h11 is ever used
        drain_s = float(os.environ.get("SERVING_LOG_DRAIN_S", "10"))
        self.config.timeout_graceful_shutdown = max(self.cfg.graceful_timeout - drain_s - 2, 1)

    async def _serve(self) -> None:
        self.config.app = self.wsgi
        server = RollgateServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)


worker_class = RollgateWorker
timeout = 60
# Answering the requests in flight, then draining the prediction log (SERVING_LOG_DRAIN_S).
graceful_timeout = int(os.environ.get("GUNICORN_GRACEFUL_TIMEOUT", "25"))
keepalive = 5
accesslog = os.environ.get("GUNICORN_ACCESSLOG", "-") or None  # empty: no access log
errorlog = "-"
loglevel = os.environ.get("GUNICORN_LOGLEVEL", "info")
proc_name = "rollgate-web"

# prometheus_client's multiprocess mode: every worker writes its samples under this folder and
# GET /metrics adds them up. It must be set before any worker imports prometheus_client.
_metrics_dir = os.environ.setdefault(
    "PROMETHEUS_MULTIPROC_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "var", "prometheus"),
)


def on_starting(server):
    """Start each run with empty metrics (files of dead workers would be added up forever)."""
    import shutil

    shutil.rmtree(_metrics_dir, ignore_errors=True)
    os.makedirs(_metrics_dir, exist_ok=True)


def post_worker_init(worker):
    """Warm every routed (and launching, and rollback-target) model version before the worker
    accepts its first request: loading a pyfunc model in a fresh process takes seconds, which
    no client should wait for. Then start the worker's refresher thread, which re-reads the
    routing and key tables every half ``SERVING_ROUTE_TTL_S`` and warms new versions before
    they take traffic."""
    from django.db import connection

    from rollouts.serving.runtime import refresher, warm_all

    try:
        names = warm_all()
        worker.log.info("worker %s warmed endpoints: %s", worker.pid, ", ".join(names) or "none")
    except Exception:  # noqa: BLE001 - a cold start is slower, not broken
        worker.log.exception("warming the model cache failed; versions load on first request")
    finally:
        connection.close()
    refresher.start()
    import gc
    import sys

    # The prediction-log writer thread shares the GIL with the event loop; a short switch
    # interval keeps a bulk insert from stalling the loop's I/O for 5 ms at a time.
    sys.setswitchinterval(float(os.environ.get("SERVING_SWITCH_INTERVAL_S", "0.0002")))
    # Objects that live as long as the worker (Django, the models) leave the collector's view,
    # so that full collections do not pause scoring for tens of milliseconds.
    gc.collect()
    gc.freeze()


def worker_exit(server, worker):
    """Any end of a worker that gunicorn sees (graceful stop, SIGQUIT, WSGI workers): write the
    prediction rows still buffered (bounded by ``SERVING_LOG_DRAIN_S``), drop its metrics."""
    from prometheus_client import multiprocess

    from rollouts.serving.logbuffer import drain_at_shutdown, log_buffer

    try:
        written = drain_at_shutdown("worker exit")
        server.log.info(
            "worker %s drained %s prediction log rows (%s lost)",
            worker.pid,
            written,
            log_buffer.lost,
        )
    finally:
        multiprocess.mark_process_dead(worker.pid)

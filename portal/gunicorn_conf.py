"""Gunicorn settings for the portal and its serving API (production and `make demo` alike):

    gunicorn portal.asgi:application -c portal/gunicorn_conf.py

``WEB_CONCURRENCY`` worker processes (default 2, about one per core), each an asyncio event
loop (uvicorn with uvloop and httptools) running :mod:`portal.asgi`: scoring requests are
parsed, batched and scored in the loop, the rest of the portal is Django's ASGI handler (its
sync views run in a worker thread). Each worker keeps its own model cache and routing table.
"""

from __future__ import annotations

import os

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


class RollgateWorker(UvicornWorker):
    """uvicorn's gunicorn worker, with its access log following gunicorn's ``accesslog``
    (uvicorn would otherwise format a line per request for a logger with no handler) and
    gunicorn's request-head limits applied to uvicorn's parser."""

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


worker_class = RollgateWorker
timeout = 60
graceful_timeout = 20
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
    """Graceful stop of a worker: write the prediction rows still buffered, drop its metrics."""
    from prometheus_client import multiprocess

    from rollouts.serving.logbuffer import log_buffer

    written = log_buffer.flush()
    server.log.info("worker %s flushed %s prediction log rows", worker.pid, written)
    multiprocess.mark_process_dead(worker.pid)

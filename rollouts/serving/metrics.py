"""Prometheus metrics of the serving data plane (``GET /metrics``, text exposition format).

Under gunicorn every worker process writes its samples to ``PROMETHEUS_MULTIPROC_DIR``
(prometheus_client's multiprocess mode, set up in ``portal/gunicorn_conf.py``), and ``/metrics``
aggregates all workers; without it, the metrics of the answering process are shown.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter(
    "rollgate_serving_requests_total",
    "Scoring requests answered, by endpoint, model version and HTTP status.",
    ["endpoint", "version", "status"],
)
LATENCY = Histogram(
    "rollgate_serving_request_seconds",
    "Server time of scoring requests, by endpoint and model version.",
    ["endpoint", "version"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
)
BATCH_ROWS = Histogram(
    "rollgate_serving_batch_rows",
    "Rows scored per predict call (micro-batch size).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)


def observe(endpoint: str, version: str, status: int, seconds: float | None) -> None:
    REQUESTS.labels(endpoint, version, str(status)).inc()
    if seconds is not None:
        LATENCY.labels(endpoint, version).observe(seconds)


def observe_batch(rows: int) -> None:
    BATCH_ROWS.observe(rows)


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST

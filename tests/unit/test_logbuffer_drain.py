"""LogBuffer.drain: what a stopping serving process runs (issue 9, point 4). Everything buffered
is written; failed inserts are retried a bounded number of times, then the rows are dropped and
counted as lost (never queued forever); a drain that runs out of time gives up with a count."""

from __future__ import annotations

import threading

import pytest
from django.utils import timezone

from rollouts.models import Endpoint, Environment, PredictionLog
from rollouts.serving import logbuffer
from rollouts.serving.logbuffer import LogBuffer

pytestmark = pytest.mark.django_db


@pytest.fixture
def rows(synced, settings):
    v1, _ = synced
    endpoint = Endpoint.objects.create(
        name="drain-test",
        environment=Environment.objects.get(name="staging"),
        registered_model=v1.registered_model,
    )
    settings.SERVING_LOG_BUFFERED = True
    settings.SERVING_LOG_FLUSH_S = 3600.0  # the writer thread never flushes by itself here
    settings.SERVING_LOG_MAX_ATTEMPTS = 3

    def make(n: int) -> list[PredictionLog]:
        return [
            PredictionLog(
                endpoint=endpoint,
                model_version=v1,
                features={"x": i},
                prediction=1,
                latency_ms=1.0,
                created_at=timezone.now(),
            )
            for i in range(n)
        ]

    return make


def test_drain_writes_everything_buffered(rows):
    buffer = LogBuffer()
    for _ in range(5):
        buffer.append(rows(700))
    assert buffer.drain(30) == 3500
    assert PredictionLog.objects.count() == 3500
    assert buffer.pending() == 0 and buffer.lost == 0


def test_drain_retries_a_failed_insert_and_writes_the_rows(rows, monkeypatch):
    buffer = LogBuffer()
    buffer.append(rows(10))
    real = PredictionLog.objects.bulk_create
    calls = []

    def flaky(batch, *args, **kwargs):
        calls.append(len(batch))
        if len(calls) == 1:
            raise RuntimeError("database went away")
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(PredictionLog.objects, "bulk_create", flaky)
    assert buffer.drain(30) == 10
    assert calls == [10, 10]
    assert PredictionLog.objects.count() == 10 and buffer.lost == 0


def test_rows_failing_every_attempt_are_dropped_and_counted_not_requeued(rows, monkeypatch, caplog):
    buffer = LogBuffer()
    buffer.append(rows(4))
    attempts = []

    def broken(batch, *args, **kwargs):
        attempts.append(len(batch))
        raise RuntimeError("value out of range")

    monkeypatch.setattr(PredictionLog.objects, "bulk_create", broken)
    assert buffer.drain(30) == 0
    assert attempts == [4, 4, 4]  # SERVING_LOG_MAX_ATTEMPTS, then given up on
    assert buffer.pending() == 0 and buffer.lost == 4
    assert "4 rows lost after 3 failed attempts" in caplog.text


def test_the_writer_threads_flush_gives_up_after_the_attempts_too(rows, monkeypatch):
    buffer = LogBuffer()
    buffer.append(rows(2))
    monkeypatch.setattr(
        PredictionLog.objects, "bulk_create", lambda *a, **k: (_ for _ in ()).throw(OSError("x"))
    )
    for _ in range(3):
        with pytest.raises(OSError):
            buffer.flush()
    assert buffer.pending() == 0 and buffer.lost == 2


def test_a_drain_out_of_time_drops_what_is_left_with_a_count(rows, caplog):
    buffer = LogBuffer()
    buffer.append(rows(3))
    held = threading.Event()
    release = threading.Event()

    def hold():  # a writer thread stuck in an insert
        with buffer._write_lock:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(5)
    try:
        assert buffer.drain(0.2) == 0
    finally:
        release.set()
        thread.join()
    assert buffer.pending() == 0 and buffer.lost == 3
    assert "3 rows lost" in caplog.text


def test_drain_at_shutdown_drains_the_process_buffer(rows, monkeypatch, settings):
    buffer = LogBuffer()
    monkeypatch.setattr(logbuffer, "log_buffer", buffer)
    monkeypatch.setattr(logbuffer.connection, "close", lambda: None)  # the test's transaction
    buffer.append(rows(7))
    assert logbuffer.drain_at_shutdown("test") == 7
    assert PredictionLog.objects.count() == 7


def test_the_asgi_lifespan_shutdown_drains_the_log(rows, monkeypatch):
    import asyncio

    from rollouts.serving import asgi

    drained = []
    monkeypatch.setattr(asgi, "drain_at_shutdown", lambda where: drained.append(where) or 0)
    messages = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message["type"])

    asyncio.run(asgi.ServingApp(None)({"type": "lifespan"}, receive, send))
    assert drained == ["lifespan shutdown"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]

"""The prediction log's write path, kept off the request thread.

Requests append their rows (:class:`PredictionLog`, and :class:`ServingError` for error
answers) to an in-process buffer; a writer thread inserts them in bulk
(``bulk_create``) every ``SERVING_LOG_FLUSH_S`` seconds or ``SERVING_LOG_BATCH_ROWS`` rows,
in its own database connection.

Nothing answered may be lost when the process stops (issue 9): :meth:`LogBuffer.drain` writes
everything buffered within ``SERVING_LOG_DRAIN_S`` seconds. It runs on every way a serving
process ends: the ASGI lifespan shutdown and the uvicorn server's own shutdown after a
SIGTERM/SIGINT/SIGHUP-reload (:mod:`rollouts.serving.asgi`, ``portal/gunicorn_conf.py``),
gunicorn's ``worker_exit`` hook (SIGQUIT, WSGI workers) and interpreter exit (``runserver``).
A row whose insert fails is tried again with the next batch, at most
``SERVING_LOG_MAX_ATTEMPTS`` times in all; after that, or when the drain runs out of time, it is
dropped and logged as lost with a count (:attr:`LogBuffer.lost`), never queued forever.

With ``SERVING_LOG_BUFFERED`` off, rows are written in the request instead (one ``bulk_create``
per request), which keeps them inside the caller's transaction, as unit tests need.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time

from django.conf import settings
from django.db import close_old_connections, connection, models

from rollouts import hooks
from rollouts.serving.batching import positive_class_scores

logger = logging.getLogger(__name__)


class LogBuffer:
    def __init__(self) -> None:
        self._rows: list[models.Model] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.written = 0
        self.failed_batches = 0
        #: Rows given up on (attempts exhausted, or still queued when a drain ran out of time).
        self.lost = 0
        #: Failed insert attempts so far, by ``id(row)``, for rows queued again after a failure.
        self._attempts: dict[int, int] = {}

    def append(self, rows: list[models.Model]) -> None:
        """Queue unsaved model instances for writing (or write them now when buffering is off).
        One call's rows are all of one model class."""
        if not rows:
            return
        if not settings.SERVING_LOG_BUFFERED:
            fill_scores(rows)
            type(rows[0]).objects.bulk_create(rows)
            _mark_stale(rows)
            return
        with self._lock:
            self._rows.extend(rows)
            pending = len(self._rows)
        self._ensure_thread()
        if pending >= settings.SERVING_LOG_BATCH_ROWS:
            self._wake.set()

    def pending(self) -> int:
        with self._lock:
            return len(self._rows)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            with self._lock:
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(
                        target=self._run, name="rollgate-log-writer", daemon=True
                    )
                    self._thread.start()

    def _run(self) -> None:
        while True:
            self._wake.wait(timeout=settings.SERVING_LOG_FLUSH_S)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # noqa: BLE001 - keep the writer alive; rows stay queued
                logger.exception("writing the prediction log failed; will retry")
                time.sleep(1.0)
            finally:
                close_old_connections()

    def flush(self) -> int:
        """Write every queued row now; returns how many were written.

        Rows of a failed insert are queued again, in order, unless they have now failed
        ``SERVING_LOG_MAX_ATTEMPTS`` times: those are dropped and logged as lost. The error is
        raised either way."""
        with self._write_lock:
            return self._flush_locked()

    def _flush_locked(self) -> int:
        with self._lock:
            rows, self._rows = self._rows, []
        if not rows:
            return 0
        by_class: dict[type[models.Model], list[models.Model]] = {}
        for row in rows:
            by_class.setdefault(type(row), []).append(row)
        done: set[int] = set()
        try:
            fill_scores(rows)
            for cls, group in by_class.items():
                for start in range(0, len(group), 2000):
                    chunk = group[start : start + 2000]
                    cls.objects.bulk_create(chunk)
                    done.update(map(id, chunk))
        except Exception as exc:
            self.failed_batches += 1
            self._requeue([row for row in rows if id(row) not in done], exc)
            raise
        finally:
            for key in done:
                self._attempts.pop(key, None)
        try:
            _mark_stale(rows)
        except Exception:  # noqa: BLE001 - the rows are written; rollups catch up later
            logger.exception("marking the logged hours stale failed")
        self.written += len(rows)
        return len(rows)

    def _requeue(self, failed: list[models.Model], exc: BaseException) -> None:
        """Queue ``failed`` again at the front, except the rows out of attempts (dropped)."""
        limit = max(settings.SERVING_LOG_MAX_ATTEMPTS, 1)
        keep, dropped = [], 0
        for row in failed:
            attempts = self._attempts.get(id(row), 0) + 1
            if attempts >= limit:
                self._attempts.pop(id(row), None)
                dropped += 1
            else:
                self._attempts[id(row)] = attempts
                keep.append(row)
        with self._lock:
            self._rows[:0] = keep
        if dropped:
            self.lost += dropped
            logger.error(
                "prediction log: %s rows lost after %s failed attempts (%s); %s lost in all",
                dropped,
                limit,
                exc,
                self.lost,
            )

    def drain(self, timeout: float) -> int:
        """Write everything buffered, trying for at most ``timeout`` seconds; returns the rows
        written. For the end of a process: failed inserts are retried (each row at most
        ``SERVING_LOG_MAX_ATTEMPTS`` times) until the buffer is empty or the time is up; the
        rows still queued then are dropped and logged as lost (:attr:`lost`). Never raises.

        Waits for a flush of the writer thread that is under way (up to ``timeout``)."""
        deadline = time.monotonic() + max(timeout, 0.0)
        written = 0
        if not self._write_lock.acquire(timeout=max(timeout, 0.0)):
            self._give_up(f"the writer thread held the log for over {timeout:g} s")
            return 0
        try:
            while self.pending():
                try:
                    written += self._flush_locked()
                except Exception as exc:  # noqa: BLE001 - retried below, bounded by attempts
                    logger.warning("prediction log drain: insert failed (%s); retrying", exc)
                    pause = min(0.2, deadline - time.monotonic())
                    if pause > 0:
                        time.sleep(pause)
                if time.monotonic() >= deadline and self.pending():
                    self._give_up(f"the drain ran out of its {timeout:g} s")
                    break
        finally:
            self._write_lock.release()
        return written

    def _give_up(self, why: str) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
        self._attempts.clear()
        if rows:
            self.lost += len(rows)
            logger.error("prediction log: %s rows lost: %s", len(rows), why)


def fill_scores(rows: list[models.Model]) -> None:
    """Set ``score`` on prediction-log rows that carry a ``scorer`` (a binary classifier, set
    by the serving path): one ``predict_proba`` per classifier for all its rows here."""
    groups: dict[int, list] = {}
    for row in rows:
        if getattr(row, "scorer", None) is not None and getattr(row, "score", 0) is None:
            groups.setdefault(id(row.scorer), []).append(row)
    for group in groups.values():
        scores = positive_class_scores(group[0].scorer, [row.features for row in group])
        for row in group:
            row.scorer = None
        if scores is not None:
            for row, value in zip(group, scores, strict=True):
                row.score = value


def _mark_stale(rows: list[models.Model]) -> None:
    """Tell the apps that registered for it (monitoring: which hours to roll up again, one
    upsert per flush) that ``rows`` were written; see :mod:`rollouts.hooks`."""
    hooks.prediction_logged(rows)


log_buffer = LogBuffer()


def drain_at_shutdown(where: str) -> int:
    """:meth:`LogBuffer.drain` of this process's buffer within ``SERVING_LOG_DRAIN_S``, logged,
    then this thread's database connection closed; returns the rows written. Safe to call more
    than once (a later call finds nothing) and from any thread but an event loop's."""
    try:
        pending = log_buffer.pending()
        written = log_buffer.drain(settings.SERVING_LOG_DRAIN_S)
        if pending or written:
            logger.info(
                "%s: drained %s of %s buffered prediction log rows (%s lost in all)",
                where,
                written,
                pending,
                log_buffer.lost,
            )
        return written
    finally:
        connection.close()


def _flush_at_exit() -> None:
    try:
        drain_at_shutdown("exit")
    except Exception:  # noqa: BLE001 - nothing left to do at exit but say so
        logger.exception("could not drain %s prediction log rows at exit", log_buffer.pending())


atexit.register(_flush_at_exit)

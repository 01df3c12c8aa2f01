"""The prediction log's write path, kept off the request thread.

Requests append their rows (:class:`PredictionLog`, and :class:`ServingError` for error
answers) to an in-process buffer; a writer thread inserts them in bulk
(``bulk_create``) every ``SERVING_LOG_FLUSH_S`` seconds or ``SERVING_LOG_BATCH_ROWS`` rows,
in its own database connection. :func:`flush` drains everything synchronously; it runs at
interpreter exit and from gunicorn's ``worker_exit`` hook, so a graceful shutdown loses no row.

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
        """Write every queued row now; returns how many. Rows of a failed insert are queued
        again, in order, and the error is raised."""
        with self._write_lock:
            with self._lock:
                rows, self._rows = self._rows, []
            if not rows:
                return 0
            fill_scores(rows)
            by_class: dict[type[models.Model], list[models.Model]] = {}
            for row in rows:
                by_class.setdefault(type(row), []).append(row)
            done: set[int] = set()
            try:
                for cls, group in by_class.items():
                    for start in range(0, len(group), 2000):
                        chunk = group[start : start + 2000]
                        cls.objects.bulk_create(chunk)
                        done.update(map(id, chunk))
            except Exception:
                self.failed_batches += 1
                with self._lock:
                    self._rows[:0] = [row for row in rows if id(row) not in done]
                raise
            try:
                _mark_stale(rows)
            except Exception:  # noqa: BLE001 - the rows are written; rollups catch up later
                logger.exception("marking the logged hours stale failed")
            self.written += len(rows)
            return len(rows)


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
    """Tell monitoring which hours to roll up again (one upsert per flush)."""
    from monitoring.rollups import mark_logged_rows

    mark_logged_rows(rows)


log_buffer = LogBuffer()


def _flush_at_exit() -> None:
    try:
        written = log_buffer.flush()
        if written:
            logger.info("flushed %s prediction log rows at exit", written)
    except Exception:  # noqa: BLE001 - nothing left to do at exit but say so
        logger.exception("could not flush %s prediction log rows at exit", log_buffer.pending())
    finally:
        connection.close()


atexit.register(_flush_at_exit)

"""Celery beat's scheduler for Rollgate (``CELERY_BEAT_SCHEDULER``): the stock shelve-backed
``PersistentScheduler`` that survives an unreadable schedule file.

Beat keeps only *when each periodic task last ran* in its file (``-s``, default
``CELERY_BEAT_SCHEDULE_FILENAME``); the schedule itself is ``CELERY_BEAT_SCHEDULE``. A beat
killed while it writes the file (Ctrl-C on ``make demo``, SIGKILL, a full disk) leaves it
truncated. Celery 5 discards a file that fails to *open*, but the values are unpickled later,
and a truncated value raises ``EOFError`` (dbm.dumb, the only dbm of a Python built without
gdbm), which Celery does not catch there: beat exits, and so does the whole demo. Losing the
last-run times only moves each task's next run to one interval from the restart (the periodic
tasks are idempotent), so a file that cannot be read is discarded with a warning and beat
starts with a fresh schedule.
"""

from __future__ import annotations

import logging
import shelve

from celery.beat import PersistentScheduler

logger = logging.getLogger(__name__)


class RecoveringScheduler(PersistentScheduler):
    """``PersistentScheduler`` whose store opening reads every stored value once; a file that
    cannot be opened or read (any exception: ``EOFError``, ``dbm.error``, pickle errors, ...)
    is removed, with a WARNING naming it, and a fresh store is opened in its place."""

    def _open_schedule(self) -> shelve.Shelf:
        try:
            store = super()._open_schedule()
        except Exception as exc:  # noqa: BLE001 - whatever the dbm backend raises
            return self._discard_and_reopen(exc, None)
        try:
            for key in list(store.keys()):
                store[key]  # unpickles the value: a truncated or garbage file fails here
        except Exception as exc:  # noqa: BLE001 - EOFError, UnpicklingError, ImportError, ...
            return self._discard_and_reopen(exc, store)
        return store

    def _discard_and_reopen(self, exc: Exception, store: shelve.Shelf | None) -> shelve.Shelf:
        logger.warning(
            "beat: the schedule file %s cannot be read (%r); discarding it and starting "
            "with a fresh schedule (each periodic task runs at its next interval)",
            self.schedule_filename,
            exc,
        )
        if store is not None:
            store.cache.clear()  # do not write the half-read values back on close
            try:
                store.close()
            except Exception:  # noqa: BLE001 - the file is being thrown away anyway
                logger.debug("closing the unreadable schedule file failed", exc_info=True)
        self._remove_db()
        return super()._open_schedule()

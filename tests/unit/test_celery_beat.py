"""Beat survives an unreadable schedule file (issue 9, point 8): ``RecoveringScheduler``
discards it with a warning and starts with a fresh schedule, where Celery's own
``PersistentScheduler`` dies with ``EOFError`` on a truncated file."""

from __future__ import annotations

import ast
import logging
import struct
from pathlib import Path

import pytest
from celery.beat import PersistentScheduler
from django.conf import settings

from portal.celery import app as celery_app
from portal.celery_beat import RecoveringScheduler


@pytest.fixture
def schedule_file(tmp_path) -> Path:
    """A schedule file as beat writes it (dbm.dumb: ``.dat`` values, ``.dir`` index)."""
    path = tmp_path / "celerybeat-schedule"
    RecoveringScheduler(app=celery_app, schedule_filename=str(path)).close()
    assert Path(f"{path}.dat").stat().st_size > 0
    return path


def _entries_offset(path: Path) -> int:
    """Byte offset of the pickled ``entries`` value in the ``.dat`` file (from the index)."""
    for line in Path(f"{path}.dir").read_text().splitlines():
        key, (pos, _size) = ast.literal_eval(line)
        if key == "entries":
            return pos
    raise AssertionError("no 'entries' key in the schedule index")


def _truncate_before_entries(path: Path) -> None:
    with open(f"{path}.dat", "r+b") as dat:
        dat.truncate(_entries_offset(path))


def _truncate_inside_entries(path: Path) -> None:
    with open(f"{path}.dat", "r+b") as dat:
        dat.truncate(_entries_offset(path) + 10)


def _empty(path: Path) -> None:
    Path(f"{path}.dat").write_bytes(b"")


def _garbage_values(path: Path) -> None:
    size = Path(f"{path}.dat").stat().st_size
    Path(f"{path}.dat").write_bytes((bytes(range(256)) * (size // 256 + 1))[:size])


def _garbage_index(path: Path) -> None:
    Path(f"{path}.dir").write_text("'entries', (0, \n\x00\x01 garbage")


def _foreign_dbm(path: Path) -> None:
    """A GNU dbm file (its magic number), as a Python built with gdbm leaves; this one has none."""
    for suffix in (".dat", ".dir", ".bak"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    path.write_bytes(struct.pack("=I", 0x13579ACE) + b"\0" * 60)


def test_celerys_own_scheduler_dies_on_a_truncated_file(schedule_file):
    """The failure the subclass exists for: without it, beat (and ``make demo``) exits."""
    _truncate_before_entries(schedule_file)
    with pytest.raises(EOFError):
        PersistentScheduler(app=celery_app, schedule_filename=str(schedule_file))


@pytest.mark.parametrize(
    "corrupt",
    [
        _truncate_before_entries,
        _truncate_inside_entries,
        _empty,
        _garbage_values,
        _garbage_index,
        _foreign_dbm,
    ],
)
def test_an_unreadable_schedule_file_is_discarded_with_a_warning(schedule_file, corrupt, caplog):
    corrupt(schedule_file)
    with caplog.at_level(logging.WARNING):
        scheduler = RecoveringScheduler(app=celery_app, schedule_filename=str(schedule_file))
    warnings = [r for r in caplog.records if r.name == "portal.celery_beat"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert str(schedule_file) in warnings[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # A working schedule: every configured periodic task, each able to say when it is due.
    assert set(settings.CELERY_BEAT_SCHEDULE) <= set(scheduler.schedule)
    for name in settings.CELERY_BEAT_SCHEDULE:
        due, next_in_s = scheduler.schedule[name].is_due()
        assert next_in_s > 0
    scheduler.close()
    # ... written back whole: Celery's own scheduler reads the new file without complaint.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        again = PersistentScheduler(app=celery_app, schedule_filename=str(schedule_file))
    assert set(settings.CELERY_BEAT_SCHEDULE) <= set(again.schedule)
    again.close()
    assert not caplog.records


def test_a_sound_schedule_file_is_kept(schedule_file, caplog):
    """Reading every value to check the file does not reset a good one."""
    first = RecoveringScheduler(app=celery_app, schedule_filename=str(schedule_file))
    name = next(iter(settings.CELERY_BEAT_SCHEDULE))
    first.schedule[name].total_run_count = 7
    first.sync()
    first.close()
    with caplog.at_level(logging.WARNING):
        second = RecoveringScheduler(app=celery_app, schedule_filename=str(schedule_file))
    assert second.schedule[name].total_run_count == 7
    second.close()
    assert not caplog.records


def test_beat_uses_the_recovering_scheduler():
    assert celery_app.conf.beat_scheduler == "portal.celery_beat:RecoveringScheduler"

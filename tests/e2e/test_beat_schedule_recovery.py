"""A real ``celery beat`` starts on a truncated schedule file (issue 9, point 8).

``make demo`` runs ``celery -A portal beat -s var/celerybeat-schedule``; a demo killed while
beat wrote that file left it truncated, and the next beat exited with ``EOFError`` (and the
demo with it). Here the file is written as beat writes it, truncated, and a real beat process
must warn, stay up and send its due tasks.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery.beat import PersistentScheduler
from django.conf import settings

from portal.celery import app as celery_app
from portal.celery_beat import RecoveringScheduler
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _wait_for_log(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        if proc.poll() is not None:
            pytest.fail(f"beat exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {text!r} within {timeout:.0f}s:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)


def test_beat_starts_on_a_truncated_schedule_file(tmp_path, caplog):
    schedule = tmp_path / "celerybeat-schedule"
    RecoveringScheduler(app=celery_app, schedule_filename=str(schedule)).close()
    dat = Path(f"{schedule}.dat")
    with dat.open("r+b") as f:  # cut mid-file, as a kill during a write leaves it
        f.truncate(dat.stat().st_size // 2)
    log = tmp_path / "beat.log"
    env = {
        **os.environ,
        "SECRET_KEY": settings.SECRET_KEY,
        # A broker of its own: the due tasks sent here reach no worker.
        "CELERY_BROKER_URL": f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}",
        "FEEDBACK_PENDING_MATCH_S": "1",  # a task due within a second of the start
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "portal", "beat", "-l", "INFO", "-s", str(schedule)],
        cwd=ROOT,
        env=env,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_log(proc, log, "beat: Starting...", 60)
        _wait_for_log(proc, log, "Scheduler: Sending due task match-pending-feedback", 30)
        text = log.read_text()
        assert f"the schedule file {schedule} cannot be read" in text
        assert "Traceback" not in text and "beat raised exception" not in text
        assert "portal.celery_beat.RecoveringScheduler" in text  # beat's banner
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]  # a clean stop on SIGTERM
    # The file beat wrote back is whole: Celery's own scheduler reads it without complaint.
    with caplog.at_level(logging.WARNING):
        again = PersistentScheduler(app=celery_app, schedule_filename=str(schedule))
    assert set(settings.CELERY_BEAT_SCHEDULE) <= set(again.schedule)
    assert again.schedule["match-pending-feedback"].total_run_count >= 1
    again.close()
    assert not caplog.records

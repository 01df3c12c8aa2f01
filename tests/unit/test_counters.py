"""Fixed-window counters in the database (``portal.counters``): what the per-key rate limit
counts with, shared by every serving process (a per-process cache let each gunicorn worker
allow the whole limit: 6 answers for a limit of 3 with 2 workers)."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from portal.counters import window_hit
from portal.models import WindowCounter


@pytest.mark.django_db
def test_hits_count_up_within_a_window_and_start_again_in_the_next():
    assert window_hit("k", length_s=60, now=120.0) == (1, 60.0)
    assert window_hit("k", length_s=60, now=150.0) == (2, 30.0)
    assert window_hit("other", length_s=60, now=150.0)[0] == 1
    assert window_hit("k", length_s=60, now=180.5) == (1, 59.5)
    # the finished window of "k" is gone; "other" keeps its own
    assert sorted(WindowCounter.objects.values_list("name", "window", "count")) == [
        ("k", 180, 1),
        ("other", 120, 1),
    ]


@pytest.mark.django_db
def test_a_window_shorter_than_a_second_is_refused():
    with pytest.raises(ValueError):
        window_hit("k", length_s=0)


@pytest.mark.django_db(transaction=True)
def test_concurrent_hits_from_many_connections_are_all_counted():
    """Eight threads, each with its own database connection (as separate processes would
    have), count 25 hits each at the same moment: no hit is lost."""
    start = threading.Barrier(8)
    errors = []

    def hit():
        try:
            start.wait()
            for _ in range(25):
                window_hit("shared", length_s=3600, now=7200.0)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=hit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert WindowCounter.objects.get(name="shared").count == 200

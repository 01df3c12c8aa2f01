"""Fixed-window counters in the database: the per-key rate limit of the serving API counts
here, so that it holds across every serving process and replica (a process-local cache would
let each gunicorn worker allow the whole limit).

One call is one statement, ``INSERT ... ON CONFLICT (name, window) DO UPDATE SET count =
count + 1 RETURNING count``, atomic on PostgreSQL and on SQLite (3.35 or later). Rows of
finished windows are deleted by the first count of each new window of the same name.
"""

from __future__ import annotations

from time import time as _clock

from django.db import connection, transaction

from portal.models import WindowCounter

_TABLE = WindowCounter._meta.db_table


def window_hit(name: str, *, length_s: int, now: float | None = None) -> tuple[int, float]:
    """Count one hit of ``name`` in the current window of ``length_s`` seconds.

    Returns (hits in this window so far, this one included; seconds until the window ends).
    Raises django.db.DatabaseError when the database cannot be written."""
    if length_s < 1:
        raise ValueError("length_s must be at least 1 second")
    now = _clock() if now is None else now
    window = int(now // length_s) * length_s
    quoted = connection.ops.quote_name
    sql = (
        f"INSERT INTO {quoted(_TABLE)} (name, {quoted('window')}, count) VALUES (%s, %s, 1) "
        f"ON CONFLICT (name, {quoted('window')}) DO UPDATE SET count = {quoted(_TABLE)}.count + 1 "
        "RETURNING count"
    )
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, [name, window])
        (count,) = cursor.fetchone()
        if count == 1:  # the first hit of a new window: forget the finished ones
            WindowCounter.objects.filter(name=name, window__lt=window).delete()
    return int(count), window + length_s - now

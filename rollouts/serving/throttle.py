"""Throttle for wrong serving keys, per client address.

An address that sent ``SERVING_BAD_KEY_LIMIT`` invalid keys within the current window of
``SERVING_BAD_KEY_WINDOW_S`` seconds is answered 429 until the window ends, before its key is
looked at. Counted in Django's cache (it is read on every request, on the event loop): shared
by every replica with ``CACHE_URL`` (Redis), per process with the default local-memory cache,
where an address gets the limit once per worker. The per-key rate limit is exact across
processes: it counts in the database (``portal.counters``). Cheap enough for the
event loop (one cache read per request, one increment per bad key)."""

from __future__ import annotations

import time

from django.conf import settings
from django.core.cache import cache


def _key(client: str, window: int) -> str:
    return f"rollgate:badkey:{client}:{window}"


def _window() -> tuple[int, float]:
    size = max(1, settings.SERVING_BAD_KEY_WINDOW_S)
    now = time.time()
    return int(now // size), size - now % size


def blocked(client: str) -> int | None:
    """Seconds until ``client`` may try a key again, or None when it is not throttled."""
    if not client or settings.SERVING_BAD_KEY_LIMIT <= 0:
        return None
    window, remaining = _window()
    if (cache.get(_key(client, window)) or 0) >= settings.SERVING_BAD_KEY_LIMIT:
        return max(1, int(remaining))
    return None


def count_failure(client: str) -> None:
    """Count one invalid key sent by ``client`` in the current window."""
    if not client:
        return
    window, _ = _window()
    key = _key(client, window)
    if not cache.add(key, 1, timeout=settings.SERVING_BAD_KEY_WINDOW_S + 1):
        try:
            cache.incr(key)
        except ValueError:  # expired between add and incr
            cache.add(key, 1, timeout=settings.SERVING_BAD_KEY_WINDOW_S + 1)

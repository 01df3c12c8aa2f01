"""Leases: coordination between workers through the database, never through a cache.

A lease is a row of :class:`portal.models.Lease` (``name`` unique). It is taken with one
conditional UPDATE (``expires_at < now`` or already ours) or, for a new name, one INSERT whose
unique constraint decides a race, so two workers on any database (SQLite, PostgreSQL) never
both hold it. A holder that dies lets the lease lapse at ``expires_at``; whoever asks after that
takes it over. Leases are bookkeeping of the task machinery, not a state change of a domain
object, so they write no audit event.

Typical use::

    holder = leases.new_holder()
    if not leases.lease_acquire(name="monitoring:refresh", holder=holder, ttl=timedelta(minutes=10)):
        return  # someone else is on it
    try:
        ...
    finally:
        leases.lease_release(name="monitoring:refresh", holder=holder)
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from portal.models import Lease


def new_holder() -> str:
    """A holder id unique to this call: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def lease_acquire(*, name: str, holder: str, ttl: timedelta) -> bool:
    """Take (or renew, when ``holder`` already has it) the lease ``name`` for ``ttl``.

    Returns True when ``holder`` holds it until now + ``ttl``; False when another holder's lease
    has not expired yet. Never blocks.
    """
    now = timezone.now()
    taken = Lease.objects.filter(Q(expires_at__lt=now) | Q(holder=holder), name=name).update(
        holder=holder, expires_at=now + ttl, acquired_at=now
    )
    if taken:
        return True
    if Lease.objects.filter(name=name).exists():
        return False
    try:
        with transaction.atomic():  # a savepoint: the losing INSERT must not spoil an outer one
            Lease.objects.create(name=name, holder=holder, expires_at=now + ttl, acquired_at=now)
    except IntegrityError:
        return False  # another worker inserted it first
    return True


def lease_release(*, name: str, holder: str) -> bool:
    """Give the lease back at once; a no-op (False) when ``holder`` no longer holds it."""
    return bool(Lease.objects.filter(name=name, holder=holder).delete()[0])


@contextmanager
def leased(name: str, *, ttl: timedelta) -> Iterator[bool]:
    """``with leased("x", ttl=...) as held:`` — ``held`` says whether this call got the lease;
    it is released on exit when it was."""
    holder = new_holder()
    held = lease_acquire(name=name, holder=holder, ttl=ttl)
    try:
        yield held
    finally:
        if held:
            lease_release(name=name, holder=holder)

"""Every write made in the Django admin is audited, for every model registered there, ours and
other apps' (auth's users and groups, axes' lockouts).

``AuditedAdminSite`` is the project's default admin site (``portal.apps.AuditedAdminConfig``
in ``INSTALLED_APPS`` in place of ``django.contrib.admin``).
Its ``register`` gives a ``ModelAdmin`` that is not an :class:`AuditedModelAdmin` the audited
behaviour by subclassing it, so an admin added later is audited without anyone remembering to.

An :class:`AuditedModelAdmin` records, inside the admin's own transaction:

- ``admin.added`` / ``admin.changed``: the fields the form changed, before and after, many-to-many
  relations (team members, a user's groups, a key's endpoints) included;
- ``admin.deleted``: the row as it was, for each row a delete view or the bulk action removes;
- ``admin.changed`` for an admin view that changes a row outside the change form (Django's
  password-change form), from the ``log_change`` call the admin makes after it.

Admins whose saves go through a service function (which audits, validates and refreshes what
depends on the row) set ``audited_by_services = True`` and route ``save_model`` themselves; the
mixin then records nothing of its own for a save, so nothing is recorded twice. A deletion is
recorded by the mixin unless the admin overrides ``delete_model``/``delete_queryset`` with a
service (revoking a token, say).
Secret fields (password hashes, key digests) are recorded as changed, never by value.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db import models
from django.http import HttpRequest

from portal.audit import audit_record

#: Field names whose values never enter the audit trail (recorded as ``"<secret>"``).
SECRET_FIELDS = frozenset({"password", "key_hash", "digest", "salt", "token_key"})
SECRET = "<secret>"


def row_snapshot(obj: models.Model) -> dict[str, Any]:
    """The row's concrete fields and many-to-many relations as JSON-ready values.

    Foreign keys give the related primary key; many-to-many relations a sorted list of the
    related rows' ``str``; secret fields :data:`SECRET`."""
    values: dict[str, Any] = {}
    for field in obj._meta.concrete_fields:
        name = field.attname if field.is_relation else field.name
        values[field.name] = SECRET if field.name in SECRET_FIELDS else getattr(obj, name)
    if obj.pk is not None:
        for field in obj._meta.many_to_many:
            values[field.name] = sorted(str(related) for related in getattr(obj, field.name).all())
    return values


def snapshot_diff(
    before: dict[str, Any], after: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields whose values differ, as (before, after) dicts of just those fields."""
    changed = sorted(name for name in after if before.get(name) != after[name])
    return {n: before.get(n) for n in changed}, {n: after[n] for n in changed}


def _audited_set(request: HttpRequest) -> set[tuple[str, str]]:
    if not hasattr(request, "_rollgate_admin_audited"):
        request._rollgate_admin_audited = set()
    return request._rollgate_admin_audited


class AuditedModelAdmin(admin.ModelAdmin):
    """A ``ModelAdmin`` whose saves and deletions each write one audit event (module docstring).

    ``after_write(obj)`` runs after each audited write in the same transaction, for the caches a
    row feeds (the serving key table, say); it does nothing by default."""

    audited_by_services = False

    def after_write(self, obj: models.Model) -> None:
        pass

    def save_model(self, request, obj, form, change):
        if self.audited_by_services:
            return super().save_model(request, obj, form, change)
        before = row_snapshot(type(obj)._base_manager.get(pk=obj.pk)) if change else {}
        super().save_model(request, obj, form, change)
        request._rollgate_admin_pending = (obj, before, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        pending = getattr(request, "_rollgate_admin_pending", None)
        if pending is None:
            return
        del request._rollgate_admin_pending
        obj, before, changed = pending
        old, new = snapshot_diff(before, row_snapshot(obj))
        _audited_set(request).add((obj._meta.label, str(obj.pk)))
        if changed and not new:
            return  # the form was saved unchanged
        audit_record(
            actor=request.user,
            action="admin.changed" if changed else "admin.added",
            obj=obj,
            before=old or None,
            after=new,
        )
        self.after_write(obj)

    def log_change(self, request, obj, message):
        entry = super().log_change(request, obj, message)
        key = (obj._meta.label, str(obj.pk))
        if not self.audited_by_services and key not in _audited_set(request):
            # A change made by an admin view of its own (the password form, say).
            _audited_set(request).add(key)
            audit_record(
                actor=request.user, action="admin.changed", obj=obj, after={"admin": message}
            )
            self.after_write(obj)
        return entry

    def delete_model(self, request, obj):
        self._audit_deletion(request, obj)
        super().delete_model(request, obj)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self._audit_deletion(request, obj)
        super().delete_queryset(request, queryset)

    def _audit_deletion(self, request, obj: models.Model) -> None:
        audit_record(actor=request.user, action="admin.deleted", obj=obj, before=row_snapshot(obj))
        self.after_write(obj)


class AuditedAdminSite(admin.AdminSite):
    """The default admin site: every registered ``ModelAdmin`` is an :class:`AuditedModelAdmin`
    (a plain one is subclassed with it at registration)."""

    def register(self, model_or_iterable, admin_class=None, **options):
        admin_class = admin_class or admin.ModelAdmin
        if not issubclass(admin_class, AuditedModelAdmin):
            admin_class = type(
                f"Audited{admin_class.__name__}",
                (AuditedModelAdmin, admin_class),
                {"__module__": admin_class.__module__},
            )
        return super().register(model_or_iterable, admin_class, **options)

from __future__ import annotations

from django.apps import AppConfig
from django.contrib.admin import apps as admin_apps


class PortalConfig(AppConfig):
    default = True
    name = "portal"
    verbose_name = "Rollgate portal"


class AuditedAdminConfig(admin_apps.AdminConfig):
    """``django.contrib.admin`` with ``portal.admin_audit.AuditedAdminSite`` as ``admin.site``:
    every admin save and deletion is audited."""

    default = False  # portal's own config is PortalConfig
    default_site = "portal.admin_audit.AuditedAdminSite"

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from portal.audit import audit_verify


class Command(BaseCommand):
    help = "Verify the audit log's hash chain; exits non-zero at the first broken link."

    def handle(self, *args, **options):
        report = audit_verify()
        if report.intact:
            self.stdout.write(self.style.SUCCESS(f"audit chain intact: {report.checked} events"))
            return
        where = f"event #{report.broken_event_id}" if report.broken_event_id else "end of chain"
        raise CommandError(
            f"audit chain broken at {where}: {report.reason} ({report.checked} events verified before it)"
        )

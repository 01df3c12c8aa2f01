from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from rollouts.models import Endpoint
from rollouts.services import api_key_create


class Command(BaseCommand):
    help = "Create a serving API key scoped to endpoints; prints the key once."

    def add_arguments(self, parser):
        parser.add_argument("name", help="the client application that will use the key")
        parser.add_argument("endpoints", nargs="+", help="endpoint names the key may call")

    def handle(self, *args, name: str, endpoints: list[str], **options):
        found = list(Endpoint.objects.filter(name__in=endpoints))
        missing = sorted(set(endpoints) - {e.name for e in found})
        if missing:
            raise CommandError(f"unknown endpoint(s): {', '.join(missing)}")
        _, raw = api_key_create(name=name, endpoints=found, created_by=None)
        self.stdout.write(raw)

"""Point an MLflow webhook at this portal, so registry changes are mirrored within seconds."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.urls import reverse

from registry import mlflow_client


class Command(BaseCommand):
    help = (
        "Create or update (by name) the MLflow webhook that posts registry events to "
        "<SITE_URL>/registry/webhooks/mlflow, signed with MLFLOW_WEBHOOK_SECRET."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--name", default="rollgate", help="webhook name in MLflow")
        parser.add_argument(
            "--site-url", default=None, help="the portal's URL as MLflow reaches it (SITE_URL)"
        )

    def handle(self, *args: Any, name: str, site_url: str | None, **options: Any) -> None:
        secret = settings.MLFLOW_WEBHOOK_SECRET
        if not secret:
            raise CommandError(
                "MLFLOW_WEBHOOK_SECRET is not set: the portal would answer every delivery 503."
            )
        url = f"{(site_url or settings.SITE_URL).rstrip('/')}{reverse('registry:webhook')}"
        try:
            webhook = mlflow_client.ensure_webhook(
                name, url, secret, mlflow_client.REGISTRY_WEBHOOK_EVENTS
            )
        except mlflow_client.RegistryError as exc:
            raise CommandError(str(exc)) from exc
        verb = "created" if webhook.created else "updated"
        self.stdout.write(
            self.style.SUCCESS(
                f"{verb} webhook {webhook.name!r} ({webhook.webhook_id}) -> {webhook.url} "
                f"for {', '.join(webhook.events)}"
            )
        )

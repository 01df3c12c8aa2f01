from __future__ import annotations

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from portal.tokens import api_token_create, api_token_revoke_all


class Command(BaseCommand):
    help = (
        "Create an API token for a user and print it once (it is stored hashed), or revoke "
        "every token of the user with --revoke-all."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--hours", type=float, default=None, help="lifetime (default API_TOKEN_TTL_HOURS)"
        )
        parser.add_argument("--revoke-all", action="store_true")

    def handle(self, *args, username: str, hours: float | None, revoke_all: bool, **options):
        user = User.objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}")
        if revoke_all:
            count = api_token_revoke_all(user=user, actor=None)
            self.stdout.write(f"revoked {count} token(s) of {username}")
            return
        token, raw = api_token_create(user=user, actor=None, ttl_hours=hours)
        if token.expiry:
            self.stderr.write(f"expires {token.expiry.isoformat()}")
        self.stdout.write(raw)

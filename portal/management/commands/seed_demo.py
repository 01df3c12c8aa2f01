"""Seed the demo: real models in MLflow, one user per persona, an endpoint with an API key, and
version 1 taken to staging through the real workflow. Idempotent: a second run reuses what the
first one made (models, users and their passwords, the key) and only does what is missing.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError

from monitoring.models import DriftSettings
from monitoring.rollups import rollups_refresh
from portal.management.commands.replay_traffic import Shift, replay
from portal.management.commands.replay_traffic import simulate_days as simulate_days_of_traffic
from portal.models import Team
from portal.roles import DATA_SCIENTISTS, MANAGERS, PLATFORM_ADMINS, REVIEWERS, ensure_role_groups
from registry import mlflow_client
from registry.demo_models import train_and_register
from registry.models import ModelVersion
from registry.services import registry_sync
from rollouts import services
from rollouts.models import (
    ApiKey,
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    PredictionLog,
)

REGISTERED_MODEL = "breast-cancer-classifier"
PERSONAS = {
    "data_scientist": ("alice", DATA_SCIENTISTS),
    "reviewer": ("bob", REVIEWERS),
    "manager": ("carol", MANAGERS),
    "platform_admin": ("dana", PLATFORM_ADMINS),
    # production needs two distinct approvals, so the demo has a second reviewer
    "second_reviewer": ("erin", REVIEWERS),
}
TEAM = ("Diagnostics", "diagnostics")
STAGING_TOLERANCE = 0.05
#: The demo's drift episode: two weeks of held-out traffic, two features shifting from day 9.
EPISODE_SHIFTS = [Shift("mean radius", "*", 1.3), Shift("mean texture", "+", 4.0)]
EPISODE_SHIFT_FROM_DAY = 9
#: Drift limits of the demo endpoints. A day of demo traffic is 100 draws from the 171 held-out
#: rows, compared with the 398 training rows: two small samples, between which PSI reaches 0.8
#: and Wasserstein/σ 0.5 on unshifted features by chance alone, so the defaults (0.25, 0.1),
#: meant for large windows, would flag most features every day. With these, unshifted days stay
#: quiet and the episode's two features warn, then drift.
DEMO_DRIFT_LIMITS = {"psi_warning": 0.5, "psi_drift": 1.0, "wasserstein": 0.6}
CREDENTIALS = Path(settings.VAR_DIR) / "demo-credentials.json"
EXAMPLE_REQUEST = Path(settings.VAR_DIR) / "example-request.json"


class Command(BaseCommand):
    help = "Create the demo models, users, endpoint and API key; deploy v1 to staging."

    def add_arguments(self, parser):
        parser.add_argument("--url", default=settings.SITE_URL, help="where the portal answers")
        parser.add_argument("--replay-rows", type=int, default=120, help="held-out rows to replay")
        parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for v1")
        parser.add_argument(
            "--simulate-days",
            type=int,
            default=14,
            help="days of simulated traffic with a drift episode (0: none)",
        )

    def handle(
        self, *args, url: str, replay_rows: int, timeout: float, simulate_days: int, **options
    ):
        previous = json.loads(CREDENTIALS.read_text()) if CREDENTIALS.exists() else {}
        users = self._users(previous.get("users", {}))
        team, _ = Team.objects.get_or_create(slug=TEAM[1], defaults={"name": TEAM[0]})
        team.members.add(users["data_scientist"][0])
        # The demo's v2 (random forest) scores a few points below v1 on the held-out split:
        # staging lets a drop of up to 0.05 through its metrics gate, production keeps 0.
        staging = Environment.objects.get(name="staging")
        if staging.metric_tolerance < STAGING_TOLERANCE:
            services.environment_policy_update(
                environment_id=staging.pk,
                actor=users["platform_admin"][0],
                changes={"metric_tolerance": STAGING_TOLERANCE},
            )
        self._register_models()
        registry_sync()
        v1 = ModelVersion.objects.get(registered_model__name=REGISTERED_MODEL, version=1)
        staging = Environment.objects.get(name="staging")
        endpoints = [
            services.endpoint_for(model_version=v1, environment=env)
            for env in Environment.objects.all()
        ]
        endpoint = next(e for e in endpoints if e.environment_id == staging.pk)
        for each in endpoints:
            DriftSettings.objects.get_or_create(endpoint=each, defaults=DEMO_DRIFT_LIMITS)
        api_key = self._api_key(previous.get("api_key"), endpoints)
        self._deploy_v1(v1, staging, users, timeout)
        if not PredictionLog.objects.filter(endpoint=endpoint).exists() and replay_rows > 0:
            counts = replay(url=url, endpoint=endpoint.name, api_key=api_key, rows=replay_rows)
            self.stdout.write(
                f"replayed {counts['sent']} held-out rows with {counts['labeled']} labels"
            )
            if simulate_days > EPISODE_SHIFT_FROM_DAY:
                counts = simulate_days_of_traffic(
                    url=url,
                    endpoint=endpoint.name,
                    api_key=api_key,
                    days=simulate_days,
                    rows_per_day=100,
                    shifts=EPISODE_SHIFTS,
                    shift_from_day=EPISODE_SHIFT_FROM_DAY,
                )
                self.stdout.write(
                    f"simulated {simulate_days} days ({counts['sent']} requests); "
                    f"{', '.join(s.feature for s in EPISODE_SHIFTS)} drift from day "
                    f"{EPISODE_SHIFT_FROM_DAY}"
                )
            done = rollups_refresh()
            self.stdout.write(f"rolled up {done.hours} hours and {done.days} days")
        credentials = {
            "url": url,
            "users": {
                persona: {"username": user.username, "password": password}
                for persona, (user, password) in users.items()
            },
            "endpoint": endpoint.name,
            "api_key": api_key,
            "registered_model": REGISTERED_MODEL,
            "mlflow_tracking_uri": settings.MLFLOW_TRACKING_URI,
        }
        EXAMPLE_REQUEST.write_text(json.dumps(v1.input_example, indent=1) + "\n")
        CREDENTIALS.write_text(json.dumps(credentials, indent=2) + "\n")
        CREDENTIALS.chmod(0o600)
        self.stdout.write(json.dumps(credentials, indent=2))

    def _register_models(self) -> None:
        remote = {m.name: m for m in mlflow_client.list_registered_models()}
        have = len(remote[REGISTERED_MODEL].versions) if REGISTERED_MODEL in remote else 0
        for number, kind in ((1, "logistic"), (2, "forest")):
            if have < number:
                version = train_and_register(kind, REGISTERED_MODEL)
                self.stdout.write(f"registered {REGISTERED_MODEL} v{version} ({kind})")

    def _users(self, previous: dict) -> dict[str, tuple[User, str]]:
        groups = ensure_role_groups()
        users = {}
        for persona, (username, role) in PERSONAS.items():
            password = (previous.get(persona) or {}).get("password") or secrets.token_urlsafe(12)
            user, _ = User.objects.get_or_create(
                username=username, defaults={"email": f"{username}@example.com"}
            )
            user.set_password(password)
            if role == PLATFORM_ADMINS:
                user.is_staff = user.is_superuser = True
            user.save()
            user.groups.add(groups[role])
            users[persona] = (user, password)
        return users

    def _api_key(self, previous: str | None, endpoints: list[Endpoint]) -> str:
        if previous:
            key = ApiKey.objects.filter(
                key_hash=services.api_key_hash(previous), revoked_at__isnull=True
            ).first()
            if key is not None:
                key.endpoints.add(*endpoints)
                return previous
        _, raw = services.api_key_create(name="demo client", endpoints=endpoints, created_by=None)
        return raw

    def _deploy_v1(
        self, v1: ModelVersion, staging: Environment, users: dict, timeout: float
    ) -> None:
        """Request (data scientist), wait for the worker to run the gates, approve (reviewer),
        and wait for the worker to deploy."""
        endpoint = services.endpoint_for(model_version=v1, environment=staging)
        if endpoint.deployments.filter(status=Deployment.Status.LIVE).exists():
            return  # something is live already (v1, or whatever the user deployed since)
        req = (
            DeploymentRequest.objects.filter(model_version=v1, endpoint=endpoint)
            .exclude(status__in=DeploymentRequest.TERMINAL)
            .first()
        )
        if req is None:
            req = services.deployment_request_create(
                requester=users["data_scientist"][0],
                model_version=v1,
                environment=staging,
                justification="Baseline scaled logistic regression for the demo.",
            )
        deadline = time.monotonic() + timeout
        while req.status != DeploymentRequest.Status.LIVE:
            if req.status == DeploymentRequest.Status.AWAITING_REVIEW:
                services.deployment_request_approve(
                    request_id=req.pk, reviewer=users["reviewer"][0], comment="Metrics look right."
                )
            if req.status in DeploymentRequest.TERMINAL:
                raise CommandError(f"deploying {v1} ended {req.status}: {req.status_reason}")
            if time.monotonic() > deadline:
                raise CommandError(
                    f"{v1} not live after {timeout:.0f}s: is the Celery worker running?"
                )
            time.sleep(0.5)
            req.refresh_from_db()
        self.stdout.write(f"{v1} is live on {endpoint.name}")

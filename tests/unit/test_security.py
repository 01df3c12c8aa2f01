"""Issue 9, point 5: API tokens hashed, shown once, expiring and revocable; brute-force lockout
on every login; HTTPS settings and `check --deploy`; /metrics and ping disclosure; key scope."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.admin.sites import site as admin_site
from django.core.cache import cache
from django.core.management import call_command
from django.utils import timezone
from knox.models import AuthToken
from rest_framework.test import APIClient

from portal.models import AuditEvent
from portal.tokens import api_token_create
from tests.factories import PASSWORD

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clear_throttles():
    cache.clear()
    yield
    cache.clear()


def _login(client: APIClient, username: str, password: str):
    return client.post(
        "/api/auth/token", {"username": username, "password": password}, format="json"
    )


# --- API tokens -------------------------------------------------------------------------------


def test_token_login_shows_the_token_once_and_stores_a_digest(reviewer):
    client = APIClient()
    response = _login(client, "bob", PASSWORD)
    assert response.status_code == 200, response.content
    raw = response.json()["token"]
    token = AuthToken.objects.get(user=reviewer)
    assert raw not in {token.digest, token.token_key} and raw.startswith(token.token_key)
    assert token.expiry is not None
    assert AuditEvent.objects.filter(action="api_token.created", actor=reviewer).exists()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert client.get("/api/requests").status_code == 200
    assert _login(APIClient(), "bob", "wrong").status_code == 400


def test_expired_token_is_refused(reviewer):
    token, raw = api_token_create(user=reviewer, actor=None)
    AuthToken.objects.filter(pk=token.pk).update(expiry=timezone.now() - timedelta(seconds=1))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert client.get("/api/requests").status_code in (401, 403)


def test_token_ttl_comes_from_settings(settings, reviewer):
    settings.API_TOKEN_TTL_HOURS = 2
    token, _ = api_token_create(user=reviewer, actor=None)
    assert timedelta(hours=1, minutes=59) < token.expiry - timezone.now() <= timedelta(hours=2)


def test_logout_revokes_the_token_and_logoutall_every_token(reviewer):
    _, first = api_token_create(user=reviewer, actor=None)
    _, second = api_token_create(user=reviewer, actor=None)
    _, third = api_token_create(user=reviewer, actor=None)
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {first}")
    assert client.post("/api/auth/logout").status_code == 204
    assert client.get("/api/requests").status_code in (401, 403)
    client.credentials(HTTP_AUTHORIZATION=f"Token {second}")
    assert client.get("/api/requests").status_code == 200
    assert client.post("/api/auth/logoutall").status_code == 204
    for raw in (second, third):
        client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
        assert client.get("/api/requests").status_code in (401, 403)
    actions = list(AuditEvent.objects.values_list("action", flat=True))
    assert "api_token.revoked" in actions and "api_token.revoked_all" in actions


def test_api_token_command_prints_a_working_token(reviewer, capsys):
    call_command("api_token", "bob")
    raw = capsys.readouterr().out.strip()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {raw}")
    assert client.get("/api/requests").status_code == 200
    call_command("api_token", "bob", "--revoke-all")
    assert client.get("/api/requests").status_code in (401, 403)


def test_admin_cannot_read_or_mint_tokens(client, platform_admin, reviewer):
    """No admin shows a token in plaintext, and none lets an admin create one for someone."""
    from django.apps import apps

    assert not apps.is_installed("rest_framework.authtoken")
    token, raw = api_token_create(user=reviewer, actor=None)
    client.force_login(platform_admin)
    listing = client.get("/admin/knox/authtoken/")
    assert listing.status_code == 200 and raw.encode() not in listing.content
    assert client.get("/admin/knox/authtoken/add/").status_code == 403
    model_admin = admin_site._registry[AuthToken]
    assert not model_admin.has_add_permission(None)


# --- brute force ------------------------------------------------------------------------------


def test_login_page_locks_out_after_the_failure_limit(client, reviewer, settings):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        response = client.post("/login/", {"username": "bob", "password": "wrong"})
        assert response.status_code == 200  # the form again, with its error
    # The limit-th failure locks the username out from this address.
    assert client.post("/login/", {"username": "bob", "password": "wrong"}).status_code == 429
    right = client.post("/login/", {"username": "bob", "password": PASSWORD})
    assert right.status_code == 429
    assert "_auth_user_id" not in client.session


def test_admin_login_locks_out_after_the_failure_limit(client, platform_admin, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        client.post("/admin/login/", {"username": "dana", "password": "wrong"})
    right = client.post("/admin/login/", {"username": "dana", "password": PASSWORD})
    assert right.status_code == 429


def test_token_endpoint_locks_out_after_the_failure_limit(reviewer, settings):
    client = APIClient()
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert _login(client, "bob", "wrong").status_code == 400
    assert _login(client, "bob", "wrong").status_code == 429
    assert _login(client, "bob", PASSWORD).status_code == 429
    assert not AuthToken.objects.filter(user=reviewer).exists()
    # Another address is not locked out for that username.
    other = APIClient(REMOTE_ADDR="10.0.0.9")
    assert _login(other, "bob", PASSWORD).status_code == 200


# --- HTTPS settings and check --deploy --------------------------------------------------------

PRODUCTION_ENV = {
    "SECRET_KEY": "x" * 64 + "-production-like-secret-key-with-enough-entropy-AbC123",
    "DEBUG": "0",
    "ALLOWED_HOSTS": "rollgate.example.com",
    "SECURE_HSTS_SECONDS": "31536000",
    "SECURE_HSTS_INCLUDE_SUBDOMAINS": "1",
    "SECURE_HSTS_PRELOAD": "1",
    "SECURE_SSL_REDIRECT": "1",
    "SESSION_COOKIE_SECURE": "1",
    "CSRF_COOKIE_SECURE": "1",
    "SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO,https",
}


def _check_deploy(extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SECURE_")}
    env.update(extra)
    return subprocess.run(
        [
            sys.executable,
            "-c",
            "import django, os; os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'portal.settings');"
            "django.setup(); from django.core.management import call_command;"
            "call_command('check', deploy=True, fail_level='WARNING')",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_check_deploy_is_clean_with_the_production_settings():
    result = _check_deploy(PRODUCTION_ENV)
    assert result.returncode == 0, result.stderr
    assert "WARNINGS" not in result.stderr + result.stdout


def test_check_deploy_warns_without_them():
    env = dict(PRODUCTION_ENV)
    for name in ("SECURE_HSTS_SECONDS", "SECURE_SSL_REDIRECT", "SESSION_COOKIE_SECURE"):
        env.pop(name)
    result = _check_deploy(env)
    assert result.returncode != 0
    for check_id in ("security.W004", "security.W008", "security.W012"):
        assert check_id in result.stderr


def test_security_headers_and_csp_on_pages(client, reviewer):
    client.force_login(reviewer)
    response = client.get("/")
    csp = response["Content-Security-Policy"]
    assert (
        "script-src 'self'" in csp
        and "unsafe-inline" not in csp.split("script-src")[1].split(";")[0]
    )
    assert response["X-Frame-Options"] == "DENY"


def test_templates_have_no_inline_scripts_or_handlers():
    """CSP refuses inline script: every <script> has a src, no element has an on* handler."""
    import re

    offenders = []
    for path in (ROOT / "templates").rglob("*.html"):
        text = path.read_text()
        for match in re.finditer(r"<script\b[^>]*>", text):
            if "src=" not in match.group(0):
                offenders.append(f"{path.name}: {match.group(0)}")
        offenders += [f"{path.name}: {m}" for m in re.findall(r"\son[a-z]+\s*=", text)]
        offenders += [f"{path.name}: javascript:" for _ in re.findall(r"javascript:", text)]
    assert offenders == []


# --- /metrics, ping, serving keys -------------------------------------------------------------


def test_metrics_needs_an_allowed_network_or_the_scrape_token(client, settings, db):
    settings.METRICS_SCRAPE_TOKEN = "scrape-secret"
    settings.METRICS_ALLOWED_NETWORKS = ["10.1.0.0/16"]
    outside = {"REMOTE_ADDR": "192.0.2.7"}
    assert client.get("/metrics", **outside).status_code == 403
    wrong = client.get("/metrics", headers={"Authorization": "Bearer nope"}, **outside)
    assert wrong.status_code == 403
    token = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"}, **outside)
    assert token.status_code == 200 and b"rollgate_serving" in token.content
    assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
    # The default: loopback only, and no token unless one is set.
    settings.METRICS_SCRAPE_TOKEN = ""
    settings.METRICS_ALLOWED_NETWORKS = ["127.0.0.1/32", "::1/128"]
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200
    assert (
        client.get("/metrics", headers={"Authorization": "Bearer "}, **outside).status_code == 403
    )


def test_repeated_wrong_serving_keys_are_throttled_per_address(client, settings, db):
    from rollouts.serving import invocation as inv

    settings.SERVING_BAD_KEY_LIMIT = 3
    settings.SERVING_BAD_KEY_WINDOW_S = 60

    class Routes:
        endpoint_id = 1

    class Lookups(inv.Lookups):
        def routes(self, endpoint):
            return Routes()

        def key(self, key_hash):
            return None

    def attempt(client_address: str) -> inv.Answer:
        meta = inv.Meta("POST", "ep", "Bearer rg_wrong", "", "", "", client=client_address)
        return inv.admit(meta, inv.Trace(), Lookups())

    assert [attempt("192.0.2.1").status for _ in range(3)] == [401, 401, 401]
    throttled = attempt("192.0.2.1")
    assert throttled.status == 429
    assert dict(throttled.headers)["Retry-After"].isdigit()
    assert attempt("192.0.2.2").status == 401  # another address is not affected


def test_the_lockout_page_says_why_and_for_how_long(client, reviewer, settings):
    for _ in range(settings.AXES_FAILURE_LIMIT):
        response = client.post("/login/", {"username": "bob", "password": "wrong"})
    assert response.status_code == 429
    page = response.content.decode()
    assert "Too many failed sign-ins" in page and "bob" in page
    assert str(settings.AXES_COOLOFF_TIME) in page and "class=\"top\"" in page  # the layout


def test_a_403_page_says_why_inside_the_layout(client, data_scientist):
    client.force_login(data_scientist)
    response = client.get("/rollouts/api-keys/")
    assert response.status_code == 403
    page = response.content.decode()
    assert "Only platform admins manage API keys." in page and "class=\"top\"" in page

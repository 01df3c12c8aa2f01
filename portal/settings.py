"""Rollgate settings: one module, read from the environment.

Defaults are the embedded profile of DESIGN.md (SQLite, a SQLite-backed Celery broker and an
MLflow store, all under ``var/``). ``DATABASE_URL``, ``CELERY_BROKER_URL`` and
``MLFLOW_TRACKING_URI`` switch to PostgreSQL, Redis and an MLflow tracking server.
"""

from __future__ import annotations

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(environ.Env().str("ROLLGATE_VAR_DIR", default=str(BASE_DIR / "var")))
VAR_DIR.mkdir(parents=True, exist_ok=True)

env = environ.Env()

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env.str("SECRET_KEY", default="")
# `make demo` writes its key to var/secret-key (mode 600): commands run beside the demo
# (`manage.py verify_audit`, ...) read it there when SECRET_KEY is not set.
if not SECRET_KEY and (VAR_DIR / "secret-key").is_file():
    SECRET_KEY = (VAR_DIR / "secret-key").read_text().strip()
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "SECRET_KEY must be set when DEBUG is off (or run `make demo` once, which writes "
            "var/secret-key)."
        )
    SECRET_KEY = "rollgate-insecure-development-key"  # only ever used with DEBUG on

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")

INSTALLED_APPS = [
    "portal.apps.AuditedAdminConfig",  # django.contrib.admin, every write audited
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "knox",
    "axes",
    "csp",
    "drf_spectacular",
    "django_htmx",
    "portal",
    "registry",
    "rollouts",
    "monitoring",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes asks: it turns a locked-out login's answer into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "portal.urls"
WSGI_APPLICATION = "portal.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "portal.roles.roles_context",
            ],
        },
    },
]

DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{VAR_DIR / 'rollgate.sqlite3'}"),
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets the web server, the Celery worker and beat read while one of them writes;
    # IMMEDIATE transactions take the write lock up front, so two writers queue on the
    # timeout instead of failing with "database is locked" half-way through.
    DATABASES["default"]["OPTIONS"] = {
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 30,
    }
    # A file, not memory, so that a real Celery worker process sees the test database.
    DATABASES["default"]["TEST"] = {"NAME": str(VAR_DIR / "test-rollgate.sqlite3")}
else:
    DATABASES["default"]["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=0)
    DATABASES["default"]["CONN_HEALTH_CHECKS"] = True

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "home"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = VAR_DIR / "staticfiles"
STATIC_ROOT.mkdir(exist_ok=True)
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    "portal.staticfiles.PackageFileFinder",
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
# Serve straight from the finders, so that `make demo` and tests need no collectstatic step.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

EMAIL_BACKEND = env.str("EMAIL_BACKEND", default="django.core.mail.backends.console.EmailBackend")
DEFAULT_FROM_EMAIL = env.str("DEFAULT_FROM_EMAIL", default="rollgate@localhost")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "knox.auth.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "portal.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Rollgate API",
    "DESCRIPTION": (
        "Model registry, deployment requests and approvals, environments, endpoints, API keys, "
        "teams and the audit trail. Authenticate with a session or `Authorization: Token <token>` (from `POST /api/auth/token`)."
    ),
    "VERSION": "0.1.0",
    # The schema describes every route and who may call it: for signed-in users only.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
}

# --- Celery -----------------------------------------------------------------------------------
CELERY_BROKER_URL = env.str(
    "CELERY_BROKER_URL", default=f"sqla+sqlite:///{VAR_DIR / 'celery-broker.sqlite'}"
)
CELERY_TASK_IGNORE_RESULT = True  # tasks write their outcome to the database, not a backend
CELERY_TASK_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_ACKS_LATE = True  # a task whose worker dies mid-way is delivered again
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_TIME_LIMIT = env.int("CELERY_TASK_TIME_LIMIT", default=600)
CELERY_TASK_SOFT_TIME_LIMIT = CELERY_TASK_TIME_LIMIT - 30
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
# Beat discards a schedule file it cannot read (truncated by a kill) instead of exiting.
CELERY_BEAT_SCHEDULER = "portal.celery_beat:RecoveringScheduler"
# A deploy task may run this long (hard limit, the worker kills it after); its claim on the
# request lasts this plus DEPLOY_LEASE_MARGIN_S (room for the kill itself and for clock skew
# between worker hosts), after which beat re-dispatches it (rollouts.services.deploy_lease).
DEPLOY_TIME_LIMIT_S = env.int("DEPLOY_TIME_LIMIT_S", default=180)
DEPLOY_LEASE_MARGIN_S = env.int("DEPLOY_LEASE_MARGIN_S", default=30)
DEPLOY_MAX_ATTEMPTS = env.int("DEPLOY_MAX_ATTEMPTS", default=3)
CELERY_BEAT_SCHEDULE = {
    # The fallback for missed MLflow events: mirror the registry every few minutes.
    "registry-sync": {
        "task": "registry.tasks.sync_registry",
        "schedule": env.float("REGISTRY_SYNC_INTERVAL_S", default=300.0),
    },
    "expire-requests": {
        "task": "rollouts.tasks.expire_requests",
        "schedule": env.float("REQUEST_EXPIRY_CHECK_S", default=600.0),
    },
    "redispatch-stalled": {
        "task": "rollouts.tasks.redispatch_stalled",
        "schedule": env.float("REDISPATCH_CHECK_S", default=120.0),
    },
    # Rollouts whose step is due (or whose worker died holding one): judged and advanced.
    "advance-rollouts": {
        "task": "rollouts.tasks.advance_rollouts",
        "schedule": env.float("ROLLOUT_CHECK_S", default=10.0),
    },
    # Monitoring figures: stale hours (new predictions, late labels) are rolled up again.
    "refresh-rollups": {
        "task": "monitoring.tasks.refresh_rollups",
        "schedule": env.float("ROLLUP_REFRESH_S", default=60.0),
    },
    # Alert rules read the rollups as the refresh above last left them (figures lag the log
    # by at most ROLLUP_REFRESH_S); see monitoring.alerts.
    "evaluate-alerts": {
        "task": "monitoring.tasks.evaluate_alerts",
        "schedule": env.float("ALERT_EVALUATION_S", default=60.0),
    },
}

# How long a worker's claim on a rollout step lasts, in seconds (the analysis of one step and
# its traffic change take well under this); a worker killed holding one is presumed dead then.
ROLLOUT_LEASE_S = env.int("ROLLOUT_LEASE_S", default=120)

# --- MLflow -----------------------------------------------------------------------------------
MLFLOW_TRACKING_URI = env.str(
    "MLFLOW_TRACKING_URI", default=f"sqlite:///{VAR_DIR / 'mlflow.sqlite'}"
)
MLFLOW_REGISTRY_URI = env.str("MLFLOW_REGISTRY_URI", default=MLFLOW_TRACKING_URI)
MLFLOW_ARTIFACT_ROOT = env.str("MLFLOW_ARTIFACT_ROOT", default=(VAR_DIR / "mlartifacts").as_uri())
MLFLOW_WEBHOOK_SECRET = env.str("MLFLOW_WEBHOOK_SECRET", default="")

# --- Serving ----------------------------------------------------------------------------------
SERVING_MAX_BODY_BYTES = env.int("SERVING_MAX_BODY_BYTES", default=10 * 1024 * 1024)
DATA_UPLOAD_MAX_MEMORY_SIZE = SERVING_MAX_BODY_BYTES
# How long a serving process trusts its cached routing and API-key tables, in seconds.
SERVING_ROUTE_TTL_S = env.float("SERVING_ROUTE_TTL_S", default=1.0)
# Micro-batching: the longest a request waits for others to share its predict call.
SERVING_BATCH_MAX_WAIT_MS = env.float("SERVING_BATCH_MAX_WAIT_MS", default=2.0)
SERVING_BATCH_MAX_ROWS = env.int("SERVING_BATCH_MAX_ROWS", default=256)
# Prediction log: buffered and written in bulk by a background thread (see logbuffer.py).
SERVING_LOG_BUFFERED = env.bool("SERVING_LOG_BUFFERED", default=True)
SERVING_LOG_FLUSH_S = env.float("SERVING_LOG_FLUSH_S", default=0.25)
SERVING_LOG_BATCH_ROWS = env.int("SERVING_LOG_BATCH_ROWS", default=1000)
# Error bodies name the field at fault; with this on they also echo the offending value.
SERVING_DEBUG_ERRORS = env.bool("SERVING_DEBUG_ERRORS", default=False)

CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://rollgate")}

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
    "loggers": {
        "django.db.backends": {"level": "INFO"},
        "alembic": {"level": "WARNING"},
        "mlflow": {"level": "WARNING"},
    },
}

# --- inputs (issue 9) ---
# Serving bodies: the deepest nesting of arrays and objects a JSON body may have (checked
# before it is parsed; MLflow's formats need 4), and how many bytes past an early answer
# (413, 401, ...) are read and discarded so that a client writing its whole body first still
# gets the answer; a body with more left is answered and its connection closed.
SERVING_JSON_MAX_DEPTH = env.int("SERVING_JSON_MAX_DEPTH", default=64)
SERVING_DRAIN_MAX_BYTES = env.int("SERVING_DRAIN_MAX_BYTES", default=16 * 1024 * 1024)
# --- shutdown (issue 9) ---
# A stopping serving process writes its buffered prediction log for at most this many seconds
# (rollouts.serving.logbuffer.LogBuffer.drain); gunicorn's graceful_timeout leaves room for it.
SERVING_LOG_DRAIN_S = env.float("SERVING_LOG_DRAIN_S", default=10.0)
# A prediction-log row whose insert failed this many times is dropped and logged as lost.
SERVING_LOG_MAX_ATTEMPTS = env.int("SERVING_LOG_MAX_ATTEMPTS", default=5)
# --- api (issue 9) ---
# Deepest JSON (arrays and objects) any API route or the MLflow webhook accepts; deeper is a 400.
API_JSON_MAX_DEPTH = env.int("API_JSON_MAX_DEPTH", default=64)
REST_FRAMEWORK["DEFAULT_PARSER_CLASSES"] = [
    "portal.parsers.BoundedJSONParser",
    "portal.parsers.NulFreeFormParser",
    "portal.parsers.NulFreeMultiPartParser",
]
# Last, so that its process_view sees the signed-in user (for the 400 page) after the CSRF check.
MIDDLEWARE.append("portal.middleware.RejectNulMiddleware")
# Every DRF view (ApiView or not) documents its error statuses with the shared error body.
REST_FRAMEWORK["DEFAULT_SCHEMA_CLASS"] = "portal.api.ApiSchema"
# No ``?format=`` override: an unknown one was a 404 on every route; CSV is asked for with
# ``Accept: text/csv``.
REST_FRAMEWORK["URL_FORMAT_OVERRIDE"] = None
# --- coord (issue 9) ---
# An alert action (rollback, retraining request) is claimed for this long; a worker that dies
# mid-action leaves it running past its lease, and beat runs it again, at most this many times
# in all before it is marked failed (monitoring.alerts.alert_actions_reclaim).
ALERT_ACTION_LEASE_S = env.int("ALERT_ACTION_LEASE_S", default=300)
ALERT_ACTION_MAX_ATTEMPTS = env.int("ALERT_ACTION_MAX_ATTEMPTS", default=3)
CELERY_BEAT_SCHEDULE["reclaim-alert-actions"] = {
    "task": "monitoring.tasks.reclaim_alert_actions",
    "schedule": env.float("ALERT_ACTION_RECLAIM_S", default=60.0),
}
# --- drift (issue 9) ---
# Labels sent before their prediction row is logged are kept this long (seconds), matched when
# the row is written or by the periodic task below, then dropped (monitoring.PendingFeedback).
FEEDBACK_PENDING_TTL_S = env.int("FEEDBACK_PENDING_TTL_S", default=900)
CELERY_BEAT_SCHEDULE["match-pending-feedback"] = {
    "task": "monitoring.tasks.match_pending_feedback",
    "schedule": env.float("FEEDBACK_PENDING_MATCH_S", default=30.0),
}
# --- security (issue 9) ---
from datetime import timedelta  # noqa: E402 - kept inside this block

from csp.constants import NONE, SELF  # noqa: E402

# API tokens of people (django-rest-knox): stored as a SHA-512 digest, shown once, expire.
API_TOKEN_TTL_HOURS = env.float("API_TOKEN_TTL_HOURS", default=24.0)
REST_KNOX = {
    "TOKEN_TTL": timedelta(hours=API_TOKEN_TTL_HOURS) if API_TOKEN_TTL_HOURS > 0 else None,
    "AUTO_REFRESH": False,
    "AUTH_HEADER_PREFIX": "Token",
}
# Per process (the default cache): a first brake on POST /api/auth/token. The lockout that
# holds across processes and replicas is django-axes's, in the database, below.
REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"] = {
    "auth-token": env.str("API_TOKEN_LOGIN_RATE", default="30/minute"),
}

# Brute force (django-axes): after LOGIN_FAILURE_LIMIT failed logins for one username from one
# address, that pair is locked out for LOGIN_COOLOFF_MINUTES (login page, admin, token API).
LOGIN_FAILURE_LIMIT = env.int("LOGIN_FAILURE_LIMIT", default=5)
LOGIN_COOLOFF_MINUTES = env.float("LOGIN_COOLOFF_MINUTES", default=15.0)
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = env.bool("AXES_ENABLED", default=True)
AXES_FAILURE_LIMIT = LOGIN_FAILURE_LIMIT
AXES_COOLOFF_TIME = timedelta(minutes=LOGIN_COOLOFF_MINUTES)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HTTP_RESPONSE_CODE = 429
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
# Wrong serving keys: an address that sent this many invalid keys within the window gets 429
# until the window ends (rollouts.serving.throttle; counted in the cache like the rate limit).
SERVING_BAD_KEY_LIMIT = env.int("SERVING_BAD_KEY_LIMIT", default=20)
SERVING_BAD_KEY_WINDOW_S = env.int("SERVING_BAD_KEY_WINDOW_S", default=60)

# HTTPS, from the environment; `manage.py check --deploy` is clean with the production values
# listed in the README (Production).
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=False)
# Scoring, health and scrape routes stay reachable over plain HTTP inside the cluster.
SECURE_REDIRECT_EXEMPT = [r"^serving/", r"^health$", r"^ping$", r"^metrics$"]
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=False)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=False)
_proxy_ssl_header = env.str("SECURE_PROXY_SSL_HEADER", default="")
if _proxy_ssl_header:  # "HTTP_X_FORWARDED_PROTO,https"
    _name, _, _value = _proxy_ssl_header.partition(",")
    if not _value:
        raise ImproperlyConfigured("SECURE_PROXY_SSL_HEADER is 'HEADER_NAME,value'.")
    SECURE_PROXY_SSL_HEADER = (_name.strip(), _value.strip())
SESSION_COOKIE_HTTPONLY = True
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"

# Content-Security-Policy (django-csp 4): no inline script anywhere; scripts are static files.
# Styles allow 'unsafe-inline': plotly and htmx inject style elements and attributes.
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": [SELF],
        "script-src": [SELF],
        "style-src": [SELF, "'unsafe-inline'"],
        "img-src": [SELF, "data:", "blob:"],
        "font-src": [SELF, "data:"],
        "connect-src": [SELF],
        "object-src": [NONE],
        "base-uri": [SELF],
        "form-action": [SELF],
        "frame-ancestors": [NONE],
    },
}

# /metrics: anonymous scrapes from these networks, or anyone with the bearer scrape token.
METRICS_SCRAPE_TOKEN = env.str("METRICS_SCRAPE_TOKEN", default="")
METRICS_ALLOWED_NETWORKS = env.list(
    "METRICS_ALLOWED_NETWORKS", default=["127.0.0.1/32", "::1/128"]
)
# Notifications (rollouts.notifications): an outbox row still unsent this long after it was
# written (or after its last failed send) is sent by beat; after this many failed sends it is
# marked failed with the error.
NOTIFICATION_RESEND_AFTER_S = env.float("NOTIFICATION_RESEND_AFTER_S", default=60.0)
NOTIFICATION_MAX_ATTEMPTS = env.int("NOTIFICATION_MAX_ATTEMPTS", default=5)
CELERY_BEAT_SCHEDULE["resend-notifications"] = {
    "task": "rollouts.tasks.resend_notifications",
    "schedule": env.float("NOTIFICATION_RESEND_S", default=60.0),
}

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
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off.")
    SECRET_KEY = "rollgate-insecure-development-key"  # only ever used with DEBUG on

ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])
SITE_URL = env.str("SITE_URL", default="http://127.0.0.1:8000")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "rest_framework",
    "rest_framework.authtoken",
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
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "portal.api.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Rollgate API",
    "DESCRIPTION": (
        "Model registry, deployment requests and approvals, environments, endpoints, API keys, "
        "teams and the audit trail. Authenticate with a session or `Authorization: Token <key>`."
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
# A deploy task may run this long (hard limit, the worker kills it after); its claim on the
# request lasts this plus a margin, after which beat re-dispatches it (rollouts.services).
DEPLOY_TIME_LIMIT_S = env.int("DEPLOY_TIME_LIMIT_S", default=180)
DEPLOY_MAX_ATTEMPTS = env.int("DEPLOY_MAX_ATTEMPTS", default=3)
# Test-only: seconds the deploy sleeps after claiming a request, so a test can kill the worker
# while the request is deploying. Always 0 outside that test.
DEPLOY_TEST_DELAY_S = env.float("DEPLOY_TEST_DELAY_S", default=0.0)
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

# --- shutdown (issue 9) ---
# A stopping serving process writes its buffered prediction log for at most this many seconds
# (rollouts.serving.logbuffer.LogBuffer.drain); gunicorn's graceful_timeout leaves room for it.
SERVING_LOG_DRAIN_S = env.float("SERVING_LOG_DRAIN_S", default=10.0)
# A prediction-log row whose insert failed this many times is dropped and logged as lost.
SERVING_LOG_MAX_ATTEMPTS = env.int("SERVING_LOG_MAX_ATTEMPTS", default=5)
# Notifications (rollouts.notifications): an outbox row still unsent this long after it was
# written (or after its last failed send) is sent by beat; after this many failed sends it is
# marked failed with the error.
NOTIFICATION_RESEND_AFTER_S = env.float("NOTIFICATION_RESEND_AFTER_S", default=60.0)
NOTIFICATION_MAX_ATTEMPTS = env.int("NOTIFICATION_MAX_ATTEMPTS", default=5)
CELERY_BEAT_SCHEDULE["resend-notifications"] = {
    "task": "rollouts.tasks.resend_notifications",
    "schedule": env.float("NOTIFICATION_RESEND_S", default=60.0),
}

"""ASGI entry point, what production and `make demo` serve (gunicorn with uvicorn workers, see
portal/gunicorn_conf.py): scoring requests take the event-loop fast path of
:mod:`rollouts.serving.asgi`, everything else goes to Django."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
django_application = get_asgi_application()

from rollouts.serving.asgi import ServingApp  # noqa: E402 - needs the apps loaded above

application = ServingApp(django_application)

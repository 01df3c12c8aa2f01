"""`make demo`: migrate, start the web server (gunicorn, the production configuration), a Celery
worker and Celery beat, seed the demo through them, print the logins, and stop every process it
started on Ctrl-C or SIGTERM."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from portal.management.commands.seed_demo import CREDENTIALS


def _die_with_parent() -> None:
    """Linux: the child gets SIGTERM if this supervisor dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Command(BaseCommand):
    help = "Run the whole demo: web server, Celery worker and beat, seeded data."

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
        parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"))

    def handle(self, *args, port: int, host: str, **options):
        self.children: list[subprocess.Popen] = []
        self.stopping = False
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        try:
            call_command("migrate", interactive=False, verbosity=0)
            env = {**os.environ, "PORT": str(port), "HOST": host, "SITE_URL": url}
            python = sys.executable
            self._start(
                "web",
                [
                    python,
                    "-m",
                    "gunicorn",
                    "portal.asgi:application",
                    "-c",
                    "portal/gunicorn_conf.py",
                ],
                env,
            )
            self._start(
                "worker",
                [
                    python,
                    "-m",
                    "celery",
                    "-A",
                    "portal",
                    "worker",
                    "-l",
                    "INFO",
                    "-c",
                    "2",
                    "-n",
                    "demo@%h",
                ],
                env,
            )
            self._start(
                "beat",
                [
                    python,
                    "-m",
                    "celery",
                    "-A",
                    "portal",
                    "beat",
                    "-l",
                    "INFO",
                    "-s",
                    str(settings.VAR_DIR / "celerybeat-schedule"),
                ],
                env,
            )
            self._wait_for(f"{url}/health", timeout=60)
            call_command("seed_demo", url=url)
            self._banner(url)
            while not self.stopping:
                for child in self.children:
                    if child.poll() is not None:
                        raise CommandError(
                            f"{child.args[2:5]} exited with status {child.returncode}"
                        )
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.stdout.write("stopping ...")
        finally:
            self._stop_all()

    def _start(self, name: str, cmd: list[str], env: dict[str, str]) -> None:
        self.stdout.write(f"starting {name}: {' '.join(cmd[1:])}")
        self.children.append(
            subprocess.Popen(cmd, env=env, cwd=settings.BASE_DIR, preexec_fn=_die_with_parent)
        )

    def _wait_for(self, url: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.stopping:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise CommandError(f"the web server did not answer {url} within {timeout:.0f}s")

    def _banner(self, url: str) -> None:
        creds = json.loads(CREDENTIALS.read_text())
        lines = [
            "",
            "=" * 72,
            f"Rollgate is running at {url}/",
            "Demo logins (also in var/demo-credentials.json):",
            *(
                f"  {persona:<15} {u['username']:<8} {u['password']}"
                for persona, u in creds["users"].items()
            ),
            f"Endpoint {creds['endpoint']}: POST {url}/serving/{creds['endpoint']}/invocations",
            f"  with 'Authorization: Bearer {creds['api_key']}'",
            "Press Ctrl-C to stop.",
            "=" * 72,
        ]
        self.stdout.write("\n".join(lines))

    def _on_signal(self, signum, frame) -> None:
        self.stopping = True
        raise KeyboardInterrupt

    def _stop_all(self) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for child in self.children:
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + 25
        for child in self.children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        if self.children:
            self.stdout.write("stopped web server, worker and beat")

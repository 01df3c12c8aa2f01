"""No answered prediction is lost when the real server stops (issue 9, point 4).

A real gunicorn (``portal/gunicorn_conf.py``, two uvicorn workers) serves a deployed
scikit-learn model; a thread pool sends a bounded load of scoring requests; the master gets
SIGTERM (a deploy, a scale-in, Ctrl-C) or SIGHUP (a graceful reload) in the middle of it. Every
request answered 200 must then have its prediction-log row, also when the buffer's flush
interval (``SERVING_LOG_FLUSH_S=5``) is longer than the run, so that only the drain on the
worker's shutdown path can write the rows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from django.conf import settings

from registry.demo_models import breast_cancer_split
from rollouts.models import Deployment, PredictionLog
from rollouts.services import api_key_create
from tests.conftest import ROOT, _test_database_url

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, serialized_rollback=True)]

#: Requests of one run, sent by THREADS threads; the signal goes out after SIGNAL_AFTER answers.
REQUESTS = 400
THREADS = 4
SIGNAL_AFTER = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _children(pid: int) -> set[int]:
    """Pids of the live child processes of ``pid`` (the gunicorn workers of a master)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _wait_for(predicate, timeout: float, what: str, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-4000:] if log else ""
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{tail}")


class Server:
    """``gunicorn portal.asgi:application -c portal/gunicorn_conf.py`` on the test database."""

    def __init__(self, mlflow_store, tmp: Path, **env: str) -> None:
        self.port = _free_port()
        self.log = tmp / "gunicorn.log"
        environ = {
            **os.environ,
            "DATABASE_URL": _test_database_url(),
            "MLFLOW_TRACKING_URI": mlflow_store["tracking_uri"],
            "MLFLOW_REGISTRY_URI": mlflow_store["tracking_uri"],
            "MLFLOW_ARTIFACT_ROOT": mlflow_store["artifact_root"],
            "SECRET_KEY": settings.SECRET_KEY,
            "DEBUG": "0",
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "WEB_CONCURRENCY": "2",
            "GUNICORN_ACCESSLOG": "",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp / "prometheus"),
            **env,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gunicorn",
                "portal.asgi:application",
                "-c",
                "portal/gunicorn_conf.py",
            ],
            cwd=ROOT,
            env=environ,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, endpoint: str) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                pytest.fail("gunicorn exited:\n" + self.log.read_text()[-4000:])
            try:
                return requests.get(f"{self.url}/serving/{endpoint}/ping", timeout=5).ok
            except requests.RequestException:  # not listening yet, or busy warming
                return False

        _wait_for(up, 120, "gunicorn to serve", self.log)
        # Both workers have booted (and warmed the model) when each has said so.
        _wait_for(
            lambda: self.log.read_text().count("warmed endpoints") >= 2,
            120,
            "both workers to warm the model",
            self.log,
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class Load:
    """REQUESTS scoring requests from THREADS threads; ``answered`` holds the request ids of
    the 200 answers, ``reached`` is set once SIGNAL_AFTER of them came back."""

    def __init__(self, url: str, key: str) -> None:
        split = breast_cancer_split()
        rows = split.X_test.iloc[:50]
        self.bodies = [
            json.dumps(
                {"dataframe_split": json.loads(rows.iloc[[i]].to_json(orient="split", index=False))}
            )
            for i in range(len(rows))
        ]
        self.url, self.key = url, key
        self.answered: list[str] = []
        self.other: list[str] = []
        self.reached = threading.Event()
        self._lock = threading.Lock()
        self._local = threading.local()

    def _one(self, i: int) -> None:
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
            session.headers.update(
                {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"}
            )
        try:
            response = session.post(self.url, data=self.bodies[i % len(self.bodies)], timeout=30)
        except requests.RequestException as exc:  # the server went away: not answered
            with self._lock:
                self.other.append(type(exc).__name__)
            session.close()
            self._local.session = None
            return
        with self._lock:
            if response.status_code == 200:
                self.answered.append(response.headers["X-Request-Id"])
                if len(self.answered) >= SIGNAL_AFTER:
                    self.reached.set()
            else:
                self.other.append(str(response.status_code))

    def run(self) -> threading.Thread:
        def go() -> None:
            with ThreadPoolExecutor(THREADS) as pool:
                list(pool.map(self._one, range(REQUESTS)))
            self.reached.set()

        thread = threading.Thread(target=go, daemon=True)
        thread.start()
        return thread


def _logged(request_ids: list[str]) -> int:
    return PredictionLog.objects.filter(request_id__in=request_ids).count()


@pytest.fixture
def served(synced, deploy, mlflow_store, tmp_path):
    """A live deployment of v1 and an API key for it; ``start(**env)`` starts gunicorn."""
    v1, _ = synced
    req = deploy(v1, "staging")
    assert req.status == "live", req.status_reason
    deployment = Deployment.objects.get(request=req)
    _, key = api_key_create(name="shutdown test", endpoints=[deployment.endpoint], created_by=None)
    servers: list[Server] = []

    def start(**env: str) -> tuple[Server, Load]:
        server = Server(mlflow_store, Path(tempfile.mkdtemp(dir=tmp_path)), **env)
        servers.append(server)
        server.wait_ready(deployment.endpoint.name)
        url = f"{server.url}/serving/{deployment.endpoint.name}/invocations"
        return server, Load(url, key)

    yield start
    for server in servers:
        server.stop()


@pytest.mark.parametrize("flush_s", ["0.25", "5"])
def test_sigterm_under_load_logs_every_answer(served, flush_s):
    server, load = served(SERVING_LOG_FLUSH_S=flush_s)
    thread = load.run()
    assert load.reached.wait(timeout=300), load.other[:5]
    server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=300)
    server.process.wait(timeout=60)
    answered = len(load.answered)
    assert answered >= SIGNAL_AFTER
    logged = _logged(load.answered)
    print(f"SIGTERM flush={flush_s}s: {answered} answered, {logged} logged")
    assert logged == answered, f"{answered - logged} of {answered} answered rows lost"
    assert "rows lost" not in server.log.read_text()  # nothing given up on


@pytest.mark.parametrize("flush_s", ["0.25", "5"])
def test_sighup_reload_under_load_logs_every_answer(served, flush_s):
    server, load = served(SERVING_LOG_FLUSH_S=flush_s)
    old_workers = _children(server.process.pid)
    assert len(old_workers) == 2
    thread = load.run()
    assert load.reached.wait(timeout=300), load.other[:5]
    server.process.send_signal(signal.SIGHUP)
    thread.join(timeout=300)
    # The reload replaced the workers; the old ones have gone (their buffers with them).
    _wait_for(
        lambda: not (old_workers & _children(server.process.pid)),
        90,
        "the old workers to exit",
        server.log,
    )
    answered = len(load.answered)
    assert answered >= SIGNAL_AFTER
    # The new workers' rows are written by their flush timer, the old workers' by their drain.
    # The rows written after this wait are the new workers'; a lost row never arrives.
    try:
        _wait_for(
            lambda: _logged(load.answered) >= answered,
            float(flush_s) * 2 + 15,
            "the log rows",
        )
    except pytest.fail.Exception:
        pass
    logged = _logged(load.answered)
    print(f"SIGHUP flush={flush_s}s: {answered} answered, {logged} logged")
    assert logged == answered, f"{answered - logged} of {answered} answered rows lost"
    assert server.process.poll() is None  # still serving after the reload

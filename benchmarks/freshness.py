"""How long after a routing or key change in the database a serving process can still answer
from the old data, against the real server (gunicorn, portal/gunicorn_conf.py, 2 workers).

    .venv/bin/python benchmarks/freshness.py [--workers 2] [--clients 4] [--idle 3]

Registers ``breast-cancer-classifier`` v1 (logistic) and v2 (forest) in a throw-away MLflow
store, deploys v1 to staging through the real workflow (Celery eager, in this process), starts
gunicorn, and then, with ``--clients`` threads posting one row each in a loop (a new
connection per request, so every worker gets requests):

1. under load: v2 is deployed (request, gates, approval, smoke test, live);
2. the workers idle for ``--idle`` seconds (longer than the TTL), a rollback to v1, idle again,
   then the clients resume (the issue's "quiet spell" case);
3. the same with key A revoked (the clients use key A);
4. under load: key B is revoked (the clients use key B).

The moment of a change is the commit of its transaction (an ``on_commit`` hook). For each
change it prints how many requests were *sent after it* and still answered from the old state
(old version, or 200 for a revoked key), the latest such send after the change ("lag", what
must stay under ``SERVING_ROUTE_TTL_S``) and the slowest answer among the first two seconds
of requests after it (a model loaded on the request path would show here). Last line:
    freshness: max_lag_ms=<x> stale_answers=<n> slowest_after_change_ms=<y>
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import ROOT, bench_personas, django_in, free_port, stop, wait_http  # noqa: E402

MODEL = "breast-cancer-classifier"


def setup(work: Path) -> dict:
    django_in(work)
    from registry.demo_models import breast_cancer_split, train_and_register
    from registry.models import ModelVersion
    from registry.services import registry_sync
    from rollouts import services
    from rollouts.models import Environment

    Environment.objects.filter(name="staging").update(metric_tolerance=0.1)  # v2 scores lower
    ds, reviewer = bench_personas()
    versions = [train_and_register("logistic", MODEL), train_and_register("forest", MODEL)]
    registry_sync()
    mvs = [ModelVersion.objects.get(registered_model__name=MODEL, version=v) for v in versions]
    staging = Environment.objects.get(name="staging")

    def deploy(mv):
        req = services.deployment_request_create(
            requester=ds, model_version=mv, environment=staging, justification="benchmark"
        )
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
        req.refresh_from_db()
        if req.status != "live":
            raise SystemExit(f"deployment of v{mv.version} ended {req.status}: {req.status_reason}")
        return req

    req = deploy(mvs[0])
    keys = [
        services.api_key_create(name=name, endpoints=[req.endpoint], created_by=None)
        for name in ("bench-a", "bench-b")
    ]
    row = breast_cancer_split().X_test.iloc[[0]]
    body = json.dumps({"dataframe_split": json.loads(row.to_json(orient="split", index=False))})
    return {
        "endpoint": req.endpoint,
        "versions": versions,
        "deploy": lambda: deploy(mvs[1]),
        "rollback": lambda: services.deployment_rollback(
            endpoint_id=req.endpoint.pk, actor=reviewer, reason="benchmark"
        ),
        "revoke": lambda i: services.api_key_revoke(key_id=keys[i][0].pk, actor=None),
        "keys": [k for _, k in keys],
        "body": body.encode(),
    }


def commit_marks() -> list[float]:
    """Monotonic times at which a traffic change or a key revocation committed."""
    from django.db import transaction

    from rollouts import services

    marks: list[float] = []
    audit_traffic, revoke = services._audit_traffic, services.api_key_revoke

    def traffic_hook(*args, **kwargs):
        transaction.on_commit(lambda: marks.append(time.monotonic()))
        return audit_traffic(*args, **kwargs)

    def revoke_hook(**kwargs):
        with transaction.atomic():
            transaction.on_commit(lambda: marks.append(time.monotonic()))
            return revoke(**kwargs)

    services._audit_traffic = traffic_hook
    services.api_key_revoke = revoke_hook
    return marks


class Clients:
    """Threads that post in a loop; each answer: (sent, received, status, version)."""

    def __init__(self, url: str, body: bytes, n: int) -> None:
        self.url, self.body, self.n = url, body, n
        self.key = ""
        self.answers: list[tuple[float, float, int, str | None]] = []
        self._run = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]
        for t in self._threads:
            t.start()

    def _loop(self) -> None:
        while True:
            self._run.wait()
            sent = time.monotonic()
            request = urllib.request.Request(
                self.url,
                self.body,
                {"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as r:
                    status, version = r.status, r.headers.get("X-Model-Version")
                    r.read()
            except urllib.error.HTTPError as e:
                status, version = e.code, None
                e.read()
            except OSError:
                status, version = 0, None
            self.answers.append((sent, time.monotonic(), status, version))

    def start(self) -> None:
        self._run.set()

    def pause(self) -> None:
        self._run.clear()
        time.sleep(0.5)  # requests under way finish


def report(name: str, change: float, answers, stale) -> dict:
    after = [a for a in answers if a[0] > change]
    old = [a for a in after if stale(a)]
    lag = max((a[0] - change for a in old), default=0.0) * 1000
    first = min((a[0] for a in after), default=change)
    window = [a for a in after if a[0] < first + 2.0]  # the first 2 s of requests after it
    slowest = max((a[1] - a[0] for a in window), default=0.0) * 1000
    # A client that keeps calling with a refused key is throttled (429) after
    # SERVING_BAD_KEY_LIMIT refusals: expected, counted apart from errors.
    throttled = sum(1 for a in after if a[2] == 429)
    errors = sum(1 for a in after if a[2] not in (200, 401, 429))
    print(
        f"{name:<28} requests after change={len(after):>5}  answered from old state={len(old):>3}"
        f"  max lag={lag:7.1f} ms  slowest in first 2 s={slowest:7.1f} ms  "
        f"throttled={throttled} errors={errors}",
        flush=True,
    )
    return {"lag": lag, "stale": len(old), "slowest": slowest}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--idle", type=float, default=3.0, help="idle spell before a change (s)")
    parser.add_argument("--load", type=float, default=3.0, help="load after a change (s)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rollgate-fresh-"))
    print(f"workspace {work}", flush=True)
    s = setup(work)
    from django.conf import settings
    from django.db import connection

    connection.close()
    marks = commit_marks()
    port = free_port()
    env = {
        **os.environ,
        "CELERY_TASK_ALWAYS_EAGER": "0",
        "PORT": str(port),
        "WEB_CONCURRENCY": str(args.workers),
        "GUNICORN_ACCESSLOG": "",
        "GUNICORN_LOGLEVEL": "warning",
        "PROMETHEUS_MULTIPROC_DIR": str(work / "prometheus"),
    }
    web = subprocess_popen(env)
    url = f"http://127.0.0.1:{port}/serving/{s['endpoint'].name}/invocations"
    v1, v2 = (str(v) for v in s["versions"])
    results = []
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 120, web)
        clients = Clients(url, s["body"], args.clients)
        clients.key = s["keys"][0]
        clients.start()
        time.sleep(args.load)  # every worker answers

        s["deploy"]()  # 1. a rollout under load
        time.sleep(args.load)
        results.append(
            report("rollout v2, under load", marks[-1], clients.answers, lambda a: a[3] == v1)
        )

        clients.pause()  # 2. a rollback after an idle spell
        time.sleep(args.idle)
        s["rollback"]()
        time.sleep(args.idle)  # and quiet after it: the next requests find entries past the TTL
        clients.start()
        time.sleep(args.load)
        results.append(
            report("rollback to v1, idle around", marks[-1], clients.answers, lambda a: a[3] == v2)
        )

        clients.pause()  # 3. a revocation after an idle spell
        time.sleep(args.idle)
        s["revoke"](0)
        time.sleep(args.idle)
        clients.start()
        time.sleep(args.load)
        results.append(
            report("revoke key A, idle around", marks[-1], clients.answers, lambda a: a[2] == 200)
        )

        clients.key = s["keys"][1]  # 4. a revocation under load
        time.sleep(args.load)
        s["revoke"](1)
        time.sleep(args.load)
        results.append(
            report("revoke key B, under load", marks[-1], clients.answers, lambda a: a[2] == 200)
        )
        clients.pause()
    finally:
        stop(web)
    print(
        f"freshness: ttl_s={settings.SERVING_ROUTE_TTL_S} workers={args.workers} "
        f"max_lag_ms={max(r['lag'] for r in results):.1f} "
        f"stale_answers={sum(r['stale'] for r in results)} "
        f"slowest_after_change_ms={max(r['slowest'] for r in results):.1f}"
    )


def subprocess_popen(env: dict):
    import subprocess

    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "portal.asgi:application",
            "-c",
            "portal/gunicorn_conf.py",
        ],
        cwd=ROOT,
        env=env,
    )


if __name__ == "__main__":
    main()

"""Rollgate's serving path against `mlflow models serve`, on the same model, cores and load.

    .venv/bin/python benchmarks/serving.py [--duration 15] [--connections 1,16,64] [--soak 0]

Trains the scaled logistic-regression pipeline on scikit-learn's breast-cancer data, registers
it in a throw-away MLflow store, deploys it to a Rollgate endpoint through the real workflow
(gates, approval, deployment), then drives both servers with wrk (one row per request, bounded
in time, loopback only) at each concurrency and prints requests/s, p50 and p99 for both and
the ratios. Rollgate runs its production configuration (gunicorn, portal/gunicorn_conf.py) with
validation, routing, API keys, micro-batching and prediction logging on. After Rollgate's runs
its gunicorn is stopped gracefully and the prediction-log rows are counted against the 200
answers the server reports in /metrics.

Needs `wrk` (Debian: apt-get install wrk). Last line:
    serving: throughput_ratio_c16=<x> p99_ms_c16=<y> errors=<n> lost_logs=<m>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "breast-cancer-classifier"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()
    return float(number) * _UNITS[unit]


def run_wrk(url: str, body: str, headers: dict[str, str], connections: int, duration: int) -> dict:
    """One bounded wrk run; returns rps, p50_ms, p99_ms, requests, errors."""
    lua = "wrk.method = 'POST'\nwrk.body = " + json.dumps(body) + "\n"
    for name, value in headers.items():
        lua += f"wrk.headers[{json.dumps(name)}] = {json.dumps(value)}\n"
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(lua)
    threads = min(2, connections)
    out = subprocess.run(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(connections),
            "-d",
            f"{duration}s",
            "--timeout",
            "10s",
            "--latency",
            "-s",
            fh.name,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=duration + 60,
        check=True,
    ).stdout
    os.unlink(fh.name)
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = int(m.group(1)) if (m := re.search(r"Non-2xx or 3xx responses: (\d+)", out)) else 0
    socket_errors = 0
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        socket_errors = sum(int(g) for g in m.groups())
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "requests": requests,
        "errors": non2xx + socket_errors,
    }


def django_in(work: Path) -> None:
    """Set Django up in this process on a throw-away workspace ``work`` (database, MLflow
    store, ``var/``; Celery eager), migrated."""
    os.environ.update(
        ROLLGATE_VAR_DIR=str(work / "var"),
        SECRET_KEY=os.environ.get("SECRET_KEY", "benchmark-only-key"),
        MLFLOW_TRACKING_URI=f"sqlite:///{work / 'mlflow.sqlite'}",
        MLFLOW_ARTIFACT_ROOT=(work / "artifacts").as_uri(),
        CELERY_TASK_ALWAYS_EAGER="1",
        DJANGO_SETTINGS_MODULE="portal.settings",
    )
    os.environ.setdefault("DATABASE_URL", f"sqlite:///{work / 'rollgate.sqlite3'}")
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def bench_personas():
    """(data scientist of the model's team, reviewer): the users a deployment needs."""
    from django.contrib.auth.models import Group, User

    from portal.models import Team

    team, _ = Team.objects.get_or_create(slug="diagnostics", defaults={"name": "Diagnostics"})
    ds, _ = User.objects.get_or_create(username="bench-ds")
    ds.groups.add(Group.objects.get(name="data scientists"))
    team.members.add(ds)
    reviewer, _ = User.objects.get_or_create(username="bench-reviewer")
    reviewer.groups.add(Group.objects.get(name="reviewers"))
    return ds, reviewer


def setup_rollgate(work: Path) -> dict:
    """Register the model in a fresh MLflow store and deploy it through the real workflow,
    in-process (Celery eager); returns what the load needs."""
    django_in(work)
    from registry.demo_models import breast_cancer_split, train_and_register
    from registry.models import ModelVersion
    from registry.services import registry_sync
    from rollouts import services
    from rollouts.models import DeploymentRequest, Environment

    ds, reviewer = bench_personas()
    version = train_and_register("logistic", MODEL)
    registry_sync()
    mv = ModelVersion.objects.get(registered_model__name=MODEL, version=version)
    req = services.deployment_request_create(
        requester=ds,
        model_version=mv,
        environment=Environment.objects.get(name="staging"),
        justification="benchmark",
    )
    req.refresh_from_db()
    if req.status == DeploymentRequest.Status.AWAITING_REVIEW:
        services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    req.refresh_from_db()
    if req.status != DeploymentRequest.Status.LIVE:
        raise SystemExit(f"deployment ended {req.status}: {req.status_reason}")
    _, key = services.api_key_create(name="benchmark", endpoints=[req.endpoint], created_by=None)
    row = breast_cancer_split().X_test.iloc[[0]]
    body = json.dumps({"dataframe_split": json.loads(row.to_json(orient="split", index=False))})
    return {"endpoint": req.endpoint.name, "key": key, "body": body, "version": version}


def count_log_rows() -> int:
    from django.db import connection

    from rollouts.models import PredictionLog

    connection.close()
    return PredictionLog.objects.count()


def served_ok(metrics_text: str) -> int:
    total = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("rollgate_serving_requests_total{") and 'status="200"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=15, help="seconds per run (default 15)")
    parser.add_argument("--connections", default="1,16,64", help="concurrency levels")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="gunicorn worker processes (default 1, as the baseline's `-w 1`: on two cores wrk "
        "needs the other one; 2 measured slower here, the first worker takes most connections)",
    )
    parser.add_argument(
        "--soak",
        type=int,
        default=0,
        help="also run Rollgate alone at 64 connections for this many seconds",
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk")
    levels = [int(c) for c in args.connections.split(",")]

    work = Path(tempfile.mkdtemp(prefix="rollgate-bench-"))
    print(f"workspace {work}", flush=True)
    setup = setup_rollgate(work)
    # mlflow runs `uvicorn` by name: the venv's bin folder must be on PATH.
    path = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    env = {**os.environ, "CELERY_TASK_ALWAYS_EAGER": "0", "PATH": path}

    results: dict[str, dict[int, dict]] = {"mlflow": {}, "rollgate": {}}

    port = free_port()
    mlflow_proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "models",
            "serve",
            "-m",
            f"models:/{MODEL}/{setup['version']}",
            "--env-manager",
            "local",
            "-w",
            "1",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/ping", 120, mlflow_proc)
        for c in levels:
            results["mlflow"][c] = run_wrk(
                f"http://127.0.0.1:{port}/invocations",
                setup["body"],
                {"Content-Type": "application/json"},
                c,
                args.duration,
            )
            print(f"mlflow   c={c:<3} {results['mlflow'][c]}", flush=True)
    finally:
        stop(mlflow_proc)

    port = free_port()
    web_env = {
        **env,
        "PORT": str(port),
        "WEB_CONCURRENCY": str(args.workers),
        "GUNICORN_ACCESSLOG": "",
        "GUNICORN_LOGLEVEL": "warning",
        "PROMETHEUS_MULTIPROC_DIR": str(work / "prometheus"),
    }
    web = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "portal.asgi:application",
            "-c",
            "portal/gunicorn_conf.py",
        ],
        cwd=ROOT,
        env=web_env,
    )
    url = f"http://127.0.0.1:{port}/serving/{setup['endpoint']}/invocations"
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {setup['key']}"}
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, web)
        for c in levels:
            results["rollgate"][c] = run_wrk(url, setup["body"], headers, c, args.duration)
            print(f"rollgate c={c:<3} {results['rollgate'][c]}", flush=True)
        if args.soak:
            soak = run_wrk(url, setup["body"], headers, 64, args.soak)
            results["rollgate"]["soak"] = soak
            print(f"rollgate soak 64 x {args.soak}s {soak}", flush=True)
        # Requests still queued when wrk stopped are answered (and logged) after it: wait until
        # the server's count of 200 answers stops moving.
        ok, previous = -1, -2
        while ok != previous:
            previous = ok
            time.sleep(1.0)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                ok = served_ok(r.read().decode())
    finally:
        stop(web)
    rows = count_log_rows()
    lost = ok - rows

    print()
    head = ("conns", "mlflow rps", "p50 ms", "p99 ms", "rollgate rps", "p50 ms", "p99 ms", "ratio")
    print("{:>5} | {:>10} {:>7} {:>7} | {:>12} {:>7} {:>7} | {:>6}".format(*head))
    for c in levels:
        m, r = results["mlflow"][c], results["rollgate"][c]
        ratio = r["rps"] / max(m["rps"], 1e-9)
        print(
            f"{c:>5} | {m['rps']:>10.1f} {m['p50_ms']:>7.1f} {m['p99_ms']:>7.1f} | "
            f"{r['rps']:>12.1f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} | {ratio:>6.1f}"
        )
    errors = sum(r["errors"] for r in results["rollgate"].values())
    print(
        f"rollgate answered {ok} requests with 200, logged {rows} rows, {errors} errors (non-2xx + socket)"
    )
    c16 = 16 if 16 in levels else levels[-1]
    ratio = results["rollgate"][c16]["rps"] / max(results["mlflow"][c16]["rps"], 1e-9)
    p99 = results["rollgate"][c16]["p99_ms"]
    print(
        f"serving: throughput_ratio_c16={ratio:.1f} p99_ms_c16={p99:.1f} "
        f"errors={errors} lost_logs={lost}"
    )


if __name__ == "__main__":
    main()

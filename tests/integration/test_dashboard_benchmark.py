"""``benchmarks/dashboard.py`` at a tiny size (20,000 rows over 3 days), so that the script
cannot rot unnoticed: setup, the generate_series fill, the rollups (Python sample checked against
``rollups_rebuild``), drift, and both pages as a manager. The 10-million-row run stays out of the
suite. Needs PostgreSQL: the server of ``DATABASE_URL`` when it is one, else 127.0.0.1:5432."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
LAST_LINE = re.compile(r"^dashboard: version_ms=(\S+) overview_ms=(\S+) queries=(\d+)$")


def _server() -> str:
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://")):
        parts = urlsplit(url)
        return f"postgres://{parts.netloc}"
    return "postgres://postgres@127.0.0.1:5432"


@pytest.mark.slow
def test_dashboard_benchmark_runs_end_to_end_at_a_tiny_size():
    psycopg = pytest.importorskip("psycopg")
    server = _server()
    try:
        psycopg.connect(f"{server}/postgres", connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL at {server}: {exc}")
    name = f"rollgate_bench_smoke_{os.getpid()}"
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/dashboard.py",
            "--rows",
            "20000",
            "--days",
            "3",
            "--repeats",
            "2",
            "--python-hours",
            "10",
            "--drift-days",
            "1",
            "--pg",
            server,
            "--database",
            name,
            "--var-name",
            f"bench-dashboard-smoke-{os.getpid()}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    lines = done.stdout.strip().splitlines()
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    version_ms, overview_ms, queries = float(match[1]), float(match[2]), int(match[3])
    assert version_ms > 0 and overview_ms > 0 and queries > 0
    assert "fill: 20,000 rows" in output
    assert "rebuild equals the Python path on the" in output
    assert "0 stale marks left" in output
    # The script drops its database and folder.
    with psycopg.connect(f"{server}/postgres") as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
    assert exists is None
    assert not (ROOT / "var" / f"bench-dashboard-smoke-{os.getpid()}").exists()

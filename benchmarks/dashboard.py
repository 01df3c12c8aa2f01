"""Benchmark: the version (endpoint) dashboard and the manager overview over 10 million logged
predictions on PostgreSQL.

    .venv/bin/python benchmarks/dashboard.py [--rows 10000000] [--days 90] [--repeats 5]
                                             [--drift-days 14] [--database rollgate_bench] [--keep]

Steps, each timed and printed:

1. Setup. A dedicated PostgreSQL database (``--database``, dropped and created by the script on
   ``--pg``, by default 127.0.0.1:5432 as user postgres) and its own ``ROLLGATE_VAR_DIR``
   (``var/bench-dashboard/``, wiped; MLflow's SQLite store lives there). Migrations; a team, a
   data scientist, a reviewer and a manager (roles are the ``portal.roles`` groups); three real
   versions of ``breast-cancer-classifier`` trained and registered through the MLflow client
   (``registry.demo_models.train_and_register``: logistic, forest, logistic) and mirrored with
   ``registry_sync``; one production endpoint (``rollouts.services.endpoint_for``). The
   deployment history (v1 live then superseded, v2 stable at 50 %, v3 canary at 50 %, one
   request awaiting review) is written with the ORM directly, backdated to match the log: a
   benchmark fixture, not the workflow under test (``benchmarks/serving.py`` drives that).
2. Fill. ``--rows`` prediction-log rows over ``--days`` days with server-side
   ``INSERT … SELECT … FROM generate_series`` in chunks of a million, with the table's secondary
   indexes dropped during the load and rebuilt after it (as any bulk load does). Every row is a
   one-row request (``row_index`` 0, an md5-based ``request_id``) whose ``features`` are one of
   the 569 real breast-cancer rows (all 30 features, as the serving path logs them; about 1 kB
   of jsonb per row) and whose ``prediction`` and ``score`` are what that version's model really
   answers on it. Versions by time: v1 for the first 60 % of rows, v2 after, and in the last
   20 % v3 takes every other request as a canary (60/30/10 overall). In the last 10 % of the
   period ``mean radius`` is scaled by 1.3 and ``mean texture`` shifted by +4 (a drift episode).
   Latency is lognormal (median 12 ms). Ground truth (the row's real target) arrives for 70 %
   of rows older than 7 days and 35 % of newer ones, 1–240 hours after the prediction; one
   request in 200 is also a ``ServingError`` (4 in 5 are 422 ``invalid_input``, 1 in 5 500).
3. Rollups. Every (endpoint, version, hour) with rows or errors is marked stale (what the log
   writer does row by row, in one statement). The hour-by-hour Python path
   (``monitoring.rollups.rollups_refresh``, as Celery beat runs it) is timed on the oldest
   ``--python-hours`` marks and extrapolated to all rows; at 10 M rows it is estimated at
   5–6 minutes (about 31,000 rows/s; at small sizes per-hour overheads dominate and it is far
   slower per row). All hour and day quality rollups are then rebuilt with
   ``monitoring.rollups.rollups_rebuild`` (one set-based query per version on PostgreSQL) and
   checked field by field against the hours the Python path computed. Drift rollups parse every
   logged feature row (10 M × 30 jsonb values over the whole period; about 6 s per day window
   here, so 90 days × 24 hours × 3 versions of hour windows would take hours), so the benchmark
   computes drift for the day windows of the last ``--drift-days`` days (default 14: the drift
   heatmap of recent days) and the hour windows of the last ``--drift-hours`` hours (default
   none); the other windows have no drift rollup and show as gaps.
4. Pages. As a signed-in manager, through Django's test ``Client`` in this process (server time:
   URL resolution, middleware, view, template; no network), one warm-up request per page, then
   ``--repeats`` timed ones; the median is reported. Pages: the version dashboard of the
   endpoint as it opens (its default range), the manager overview, and the version dashboard
   with the most hour windows it allows (``?window=hour&days=31``). SQL queries are counted on
   the warm-up request with an execute wrapper. A page whose warm-up takes longer than
   ``--slow-page`` seconds (a dashboard that scans the raw log) is timed once.

The bench database is dropped at the end unless ``--keep``; ``--reuse`` measures a kept one
again (migrating it; ``--skip-rollups`` to only time the pages). The last line is always
``dashboard: version_ms=<a> overview_ms=<b> queries=<n>`` (``a``: the version dashboard as it
opens) with ``n`` the largest page's query count. Targets (each page ≤ 300 ms; queries
bounded) are reported; ``--strict`` makes a missed time target exit 1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL = "breast-cancer-classifier"
KINDS = ("logistic", "forest", "logistic")
CHUNK = 1_000_000
TARGET_MS = 300.0


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------------
# Database and Django


def pg_admin(pg: str, sql: str) -> None:
    """Run one statement on the ``postgres`` maintenance database (autocommit)."""
    import psycopg

    with psycopg.connect(f"{pg}/postgres", autocommit=True) as conn:
        conn.execute(sql)


def setup_django(pg: str, database: str, var_dir: Path, *, fresh: bool = True) -> None:
    """Point Django at the bench database and var folder (recreated unless ``fresh`` is
    false: ``--reuse`` keeps both from a ``--keep`` run)."""
    if fresh:
        shutil.rmtree(var_dir, ignore_errors=True)
        var_dir.mkdir(parents=True)
        pg_admin(pg, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        pg_admin(pg, f'CREATE DATABASE "{database}"')
    elif not (var_dir / "mlflow.sqlite").exists():
        raise SystemExit(f"--reuse: {var_dir} has no MLflow store; run once with --keep")
    os.environ.update(
        DATABASE_URL=f"{pg}/{database}",
        ROLLGATE_VAR_DIR=str(var_dir),
        MLFLOW_TRACKING_URI=f"sqlite:///{var_dir / 'mlflow.sqlite'}",
        MLFLOW_REGISTRY_URI=f"sqlite:///{var_dir / 'mlflow.sqlite'}",
        MLFLOW_ARTIFACT_ROOT=(var_dir / "artifacts").as_uri(),
        CELERY_TASK_ALWAYS_EAGER="1",
        DJANGO_SETTINGS_MODULE="portal.settings",
        SECRET_KEY=os.environ.get("SECRET_KEY", "benchmark-only-key"),
        DEBUG="0",
    )
    sys.path.insert(0, str(ROOT))
    import django

    django.setup()


def drop_database(pg: str, database: str) -> None:
    from django.db import connections

    connections.close_all()
    pg_admin(pg, f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')


# ---------------------------------------------------------------------------------------------
# Fixture: people, versions, endpoint, deployment history


def build_fixture(start: datetime, end: datetime) -> dict:
    from django.contrib.auth.models import User
    from django.core.management import call_command

    from portal.models import Team
    from portal.roles import DATA_SCIENTISTS, MANAGERS, REVIEWERS, ensure_role_groups
    from registry.demo_models import train_and_register
    from registry.models import ModelVersion
    from registry.services import registry_sync
    from rollouts import services
    from rollouts.models import Deployment, DeploymentRequest, Environment

    call_command("migrate", interactive=False, verbosity=0)
    groups = ensure_role_groups()
    team, _ = Team.objects.get_or_create(slug="diagnostics", defaults={"name": "Diagnostics"})
    people = {}
    for username, role in (
        ("bench-ds", DATA_SCIENTISTS),
        ("bench-reviewer", REVIEWERS),
        ("bench-manager", MANAGERS),
    ):
        people[role], _ = User.objects.get_or_create(username=username)
        people[role].groups.add(groups[role])
    team.members.add(people[DATA_SCIENTISTS])

    numbers = [train_and_register(kind, MODEL) for kind in KINDS]
    registry_sync()
    versions = [ModelVersion.objects.get(registered_model__name=MODEL, version=n) for n in numbers]
    environment = Environment.objects.get(name="production")
    endpoint = services.endpoint_for(model_version=versions[0], environment=environment)

    # Benchmark fixture, written directly with the ORM: the deployment history that the log
    # below implies (v1 from the start, v2 at 60 % of the period, v3 as a 50 % canary at 80 %),
    # and one request awaiting review. The workflow itself is exercised by the test suite and
    # benchmarks/serving.py; here only the rows the pages read matter.
    span = end - start
    plan = [
        (versions[0], start, DeploymentRequest.Status.SUPERSEDED, Deployment.Status.RETIRED, 0),
        (
            versions[1],
            start + span * 0.6,
            DeploymentRequest.Status.LIVE,
            Deployment.Status.LIVE,
            50,
        ),
        (
            versions[2],
            start + span * 0.8,
            DeploymentRequest.Status.LIVE,
            Deployment.Status.LIVE,
            50,
        ),
    ]
    for version, live_at, request_status, deployment_status, weight in plan:
        req = DeploymentRequest.objects.create(
            model_version=version,
            endpoint=endpoint,
            justification="benchmark fixture",
            requester=people[DATA_SCIENTISTS],
            status=request_status,
        )
        DeploymentRequest.objects.filter(pk=req.pk).update(
            created_at=live_at - timedelta(hours=20),
            decided_at=live_at - timedelta(hours=2),
            live_at=live_at,
        )
        deployment = Deployment.objects.create(
            endpoint=endpoint,
            model_version=version,
            request=req,
            status=deployment_status,
            # v3 is tried against v2: a canary (stable is a row, not the larger weight).
            role=Deployment.Role.CANARY if version == versions[2] else Deployment.Role.STABLE,
            traffic_weight=weight,
            live_at=live_at,
            retired_at=start + span * 0.6
            if deployment_status == Deployment.Status.RETIRED
            else None,
        )
        Deployment.objects.filter(pk=deployment.pk).update(started_at=live_at - timedelta(hours=1))
    DeploymentRequest.objects.create(
        model_version=versions[0],
        endpoint=services.endpoint_for(
            model_version=versions[0], environment=Environment.objects.get(name="staging")
        ),
        justification="benchmark fixture: awaiting review",
        requester=people[DATA_SCIENTISTS],
        status=DeploymentRequest.Status.AWAITING_REVIEW,
    )
    return {"endpoint": endpoint, "versions": versions, "manager": people[MANAGERS]}


def load_fixture() -> tuple[dict, datetime, int]:
    """``--reuse``: the fixture, the end of the logged period and the row count of a kept
    bench database (after migrating it to the current code)."""
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db.models import Max

    from registry.models import ModelVersion
    from rollouts.models import Endpoint, PredictionLog

    call_command("migrate", interactive=False, verbosity=0)
    fixture = {
        "endpoint": Endpoint.objects.get(name=f"{MODEL}-production"),
        "versions": list(
            ModelVersion.objects.filter(registered_model__name=MODEL).order_by("version")
        ),
        "manager": User.objects.get(username="bench-manager"),
    }
    end = PredictionLog.objects.aggregate(end=Max("created_at"))["end"] + timedelta(minutes=1)
    return fixture, end, PredictionLog.objects.count()


def seed_rows(versions) -> list[tuple]:
    """The 569 real breast-cancer rows with each version's prediction and positive-class score
    (the estimators of ``make_estimator`` are deterministic, so these are the registered
    models' answers)."""
    from sklearn.datasets import load_breast_cancer

    from registry.demo_models import breast_cancer_split, make_estimator

    data = load_breast_cancer(as_frame=True)
    split = breast_cancer_split()
    answers = []
    for kind in KINDS[: len(versions)]:
        model = make_estimator(kind).fit(split.X_train, split.y_train)
        answers.append((model.predict(data.data), model.predict_proba(data.data)[:, 1]))
    rows = []
    for i in range(len(data.data)):
        features = {name: float(value) for name, value in data.data.iloc[i].items()}
        row = [i, json.dumps(features), int(data.target.iloc[i])]
        for predictions, scores in answers:
            row += [int(predictions[i]), float(scores[i])]
        rows.append(tuple(row))
    return rows


# ---------------------------------------------------------------------------------------------
# Fill


def _secondary_indexes(cursor, table: str) -> list[tuple[str, str, str]]:
    """(kind, name, definition) of every index and unique constraint but the primary key."""
    cursor.execute(
        """
        SELECT 'constraint', conname, pg_get_constraintdef(oid)
          FROM pg_constraint WHERE conrelid = %s::regclass AND contype = 'u'
        UNION ALL
        SELECT 'index', i.relname, pg_get_indexdef(i.oid)
          FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
         WHERE x.indrelid = %s::regclass AND NOT x.indisprimary
           AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)
        """,
        [table, table],
    )
    return cursor.fetchall()


def fill(fixture: dict, rows: int, days: int, end: datetime) -> dict:
    """Fill the prediction log, ground truth and serving errors; returns counts and times."""
    from django.db import connection

    versions = fixture["versions"]
    endpoint = fixture["endpoint"]
    start = end - timedelta(days=days)
    seconds = days * 86400.0
    seed = seed_rows(versions)
    n_seed = len(seed)
    timings = {}
    with connection.cursor() as cursor:
        cursor.execute("SET synchronous_commit = off")
        cursor.execute("SET maintenance_work_mem = '1GB'")
        cursor.execute("SET work_mem = '64MB'")
        cursor.execute(
            "CREATE TABLE bench_seed (i int PRIMARY KEY, features jsonb, target int, "
            "p1 int, s1 float8, p2 int, s2 float8, p3 int, s3 float8)"
        )
        cursor.executemany(
            "INSERT INTO bench_seed VALUES (%s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s)", seed
        )
        table = "rollouts_predictionlog"
        indexes = _secondary_indexes(cursor, table)
        for kind, name, _ in indexes:
            if kind == "constraint":
                cursor.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
            else:
                cursor.execute(f'DROP INDEX "{name}"')

        # Bulk-load practice: no foreign-key triggers while loading rows whose keys are known.
        loaded = ("rollouts_predictionlog", "monitoring_groundtruth", "rollouts_servingerror")
        for name in loaded:
            cursor.execute(f"ALTER TABLE {name} DISABLE TRIGGER ALL")

        began = time.perf_counter()
        params = {
            "start": start,
            "seconds": seconds,
            "step": seconds / rows,
            "jitter": seconds / rows / 1000003,
            "seed": n_seed,
            "endpoint": endpoint.pk,
            "v1": versions[0].pk,
            "v2": versions[1].pk,
            "v3": versions[2].pk,
            "v2_from": int(rows * 0.6),
            "canary_from": int(rows * 0.8),
            "drift_from": int(rows * 0.9),
        }
        for lo in range(0, rows, CHUNK):
            hi = min(rows, lo + CHUNK)
            cursor.execute(
                """
                INSERT INTO rollouts_predictionlog (request_id, row_index, endpoint_id,
                    model_version_id, api_key_id, inference_id, features, prediction, score,
                    latency_ms, created_at)
                SELECT md5('rollgate-bench-' || r.g)::uuid, 0, %(endpoint)s,
                       CASE r.v WHEN 1 THEN %(v1)s WHEN 2 THEN %(v2)s ELSE %(v3)s END,
                       NULL, '',
                       CASE WHEN r.g >= %(drift_from)s
                            THEN s.features || jsonb_build_object(
                                'mean radius', (s.features->>'mean radius')::float8 * 1.3,
                                'mean texture', (s.features->>'mean texture')::float8 + 4)
                            ELSE s.features END,
                       to_jsonb(CASE r.v WHEN 1 THEN s.p1 WHEN 2 THEN s.p2 ELSE s.p3 END),
                       CASE r.v WHEN 1 THEN s.s1 WHEN 2 THEN s.s2 ELSE s.s3 END,
                       12 * exp(0.5 * sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random())),
                       r.created_at
                  FROM (
                        SELECT t.g, t.created_at,
                               (extract(epoch FROM t.created_at) * 1000000)::bigint
                                   %% %(seed)s AS src,
                               CASE WHEN t.g < %(v2_from)s THEN 1
                                    WHEN t.g < %(canary_from)s OR t.g %% 2 = 1 THEN 2
                                    ELSE 3 END AS v
                          FROM (SELECT g, %(start)s::timestamptz + make_interval(secs =>
                                         g * %(step)s + ((g * 2654435761) %% 1000003) * %(jitter)s)
                                         AS created_at
                                  FROM generate_series(%(lo)s::bigint, %(hi)s::bigint - 1) g) t
                       ) r
                  JOIN bench_seed s ON s.i = r.src
                """,
                {**params, "lo": lo, "hi": hi},
            )
            done = time.perf_counter() - began
            log(f"fill: {hi:,} rows in {done:.1f} s ({hi / done:,.0f} rows/s)")
        timings["log_s"] = time.perf_counter() - began

        mark = time.perf_counter()
        cursor.execute(
            """
            INSERT INTO monitoring_groundtruth (prediction_id, label, received_at)
            SELECT p.id, to_jsonb(s.target),
                   least(now(), p.created_at + make_interval(hours => (1 + (p.id * 7919) %% 240)::int))
              FROM rollouts_predictionlog p
              JOIN bench_seed s
                ON s.i = (extract(epoch FROM p.created_at) * 1000000)::bigint %% %(seed)s
             WHERE (p.id * 40503) %% 100 < CASE WHEN p.created_at < %(recent)s THEN 70 ELSE 35 END
            """,
            {"seed": n_seed, "recent": end - timedelta(days=7)},
        )
        labels = cursor.rowcount
        timings["labels_s"] = time.perf_counter() - mark
        log(f"fill: {labels:,} ground-truth labels in {timings['labels_s']:.1f} s")

        mark = time.perf_counter()
        n_errors = max(1, rows // 200)
        cursor.execute(
            """
            INSERT INTO rollouts_servingerror (request_id, endpoint_id, model_version_id,
                status_code, error_code, created_at)
            SELECT md5('rollgate-bench-error-' || e)::uuid, %(endpoint)s,
                   CASE WHEN f < 0.6 THEN %(v1)s WHEN f < 0.8 OR e %% 2 = 1 THEN %(v2)s
                        ELSE %(v3)s END,
                   CASE WHEN e %% 5 = 0 THEN 500 ELSE 422 END,
                   CASE WHEN e %% 5 = 0 THEN 'model_error' ELSE 'invalid_input' END,
                   %(start)s::timestamptz + make_interval(secs => f * %(seconds)s)
              FROM (SELECT e, (e + 0.5) / %(m)s AS f FROM generate_series(0, %(m)s - 1) e) x
            """,
            {**params, "m": n_errors},
        )
        timings["errors_s"] = time.perf_counter() - mark

        for name in loaded:
            cursor.execute(f"ALTER TABLE {name} ENABLE TRIGGER ALL")
        mark = time.perf_counter()
        for kind, name, definition in indexes:
            if kind == "constraint":
                cursor.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')
            else:
                cursor.execute(definition)
        timings["indexes_s"] = time.perf_counter() - mark
        log(f"fill: {len(indexes)} secondary indexes rebuilt in {timings['indexes_s']:.1f} s")
        mark = time.perf_counter()
        cursor.execute("VACUUM (ANALYZE) rollouts_predictionlog")
        cursor.execute("VACUUM (ANALYZE) monitoring_groundtruth")
        cursor.execute("ANALYZE rollouts_servingerror")
        timings["analyze_s"] = time.perf_counter() - mark
        cursor.execute("SELECT pg_size_pretty(pg_total_relation_size('rollouts_predictionlog'))")
        size = cursor.fetchone()[0]
    timings["total_s"] = time.perf_counter() - began
    return {
        "rows": rows,
        "labels": labels,
        "errors": n_errors,
        "size": size,
        "start": start,
        "end": end,
        **timings,
    }


# ---------------------------------------------------------------------------------------------
# Rollups


def mark_all_stale() -> int:
    """What the log writer does row by row, in one statement: every (endpoint, version, hour)
    with a logged row or error becomes stale."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            """
            INSERT INTO monitoring_stalewindow (endpoint_id, model_version_id, hour, marked_at)
            SELECT endpoint_id, model_version_id, hour, now() FROM (
                SELECT endpoint_id, model_version_id,
                       date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS hour
                  FROM rollouts_predictionlog
                UNION
                SELECT endpoint_id, model_version_id,
                       date_trunc('hour', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
                  FROM rollouts_servingerror WHERE model_version_id IS NOT NULL
            ) hours
            ON CONFLICT (endpoint_id, model_version_id, hour) DO UPDATE SET marked_at = now()
            """
        )
        return cursor.rowcount


COMPARED = (
    "requests",
    "rows",
    "errors",
    "latency_hist",
    "labeled",
    "task",
    "confusion",
    "score_pos_hist",
    "score_neg_hist",
)


def refresh_rollups(
    fixture: dict, python_hours: int, drift_days: int, drift_hours: int, end: datetime
) -> dict:
    """Mark every hour stale; time the hour-by-hour Python refresh on the oldest
    ``python_hours`` marks (extrapolated to all rows); rebuild everything with the set-based
    ``rollups_rebuild``, check it against the Python-refreshed hours; then the drift of the
    last ``drift_days`` day windows and ``drift_hours`` hour windows."""
    from monitoring.models import Granularity, Rollup, StaleWindow
    from monitoring.rollups import (
        floor_day,
        floor_hour,
        refresh_drift,
        rollups_rebuild,
        rollups_refresh,
    )

    endpoint = fixture["endpoint"]
    Rollup.objects.filter(endpoint=endpoint).delete()  # --reuse: start from none
    mark = time.perf_counter()
    stale = mark_all_stale()
    log(f"rollups: {stale:,} stale hours marked in {time.perf_counter() - mark:.1f} s")
    first_hour = StaleWindow.objects.order_by("hour").values_list("hour", flat=True).first()

    began = time.perf_counter()
    sample = rollups_refresh(limit=python_hours, with_drift=False) if python_hours else None
    python_s = time.perf_counter() - began
    python_rollups = {
        (r.model_version_id, r.window_start): r
        for r in Rollup.objects.filter(endpoint=endpoint, granularity=Granularity.HOUR)
    }
    python_rows = sum(r.rows for r in python_rollups.values())
    total_rows = fixture["rows"]
    python_full_s = python_s * total_rows / python_rows if python_rows else float("nan")
    if sample:
        log(
            f"rollups: Python path (rollups_refresh) on {sample.hours} hours / "
            f"{python_rows:,} rows in {python_s:.1f} s ({python_rows / python_s:,.0f} rows/s): "
            f"about {python_full_s / 60:.1f} min for all {total_rows:,} rows"
        )

    began = time.perf_counter()
    rebuilt = rollups_rebuild(endpoint.pk, first_hour, end + timedelta(hours=1))
    quality_s = time.perf_counter() - began
    log(
        f"rollups: rollups_rebuild of {rebuilt.hours:,} hours and {rebuilt.days} days in "
        f"{quality_s:.1f} s ({total_rows / quality_s:,.0f} rows/s)"
    )
    fresh = {
        (r.model_version_id, r.window_start): r
        for r in Rollup.objects.filter(endpoint=endpoint, granularity=Granularity.HOUR)
    }
    mismatches = [
        (key, name)
        for key, expected in python_rollups.items()
        for name in COMPARED
        if key not in fresh or getattr(fresh[key], name) != getattr(expected, name)
    ]
    if mismatches:
        raise SystemExit(f"rollups_rebuild differs from the Python path: {mismatches[:5]}")
    if python_rollups:
        log(f"rollups: rebuild equals the Python path on the {len(python_rollups)} sampled hours")
    left = StaleWindow.objects.count()

    began = time.perf_counter()
    windows = 0
    first = {
        Granularity.DAY: floor_day(end) - timedelta(days=drift_days - 1),
        Granularity.HOUR: floor_hour(end) - timedelta(hours=drift_hours - 1),
    }
    for granularity, count in ((Granularity.DAY, drift_days), (Granularity.HOUR, drift_hours)):
        if count <= 0:
            continue
        for version in fixture["versions"]:
            with_rows = Rollup.objects.filter(
                endpoint=endpoint,
                model_version=version,
                granularity=granularity,
                window_start__gte=first[granularity],
                rows__gt=0,
            ).values_list("window_start", flat=True)
            for window_start in with_rows:
                refresh_drift(endpoint.pk, version, granularity, window_start)
                windows += 1
    drift_s = time.perf_counter() - began
    log(
        f"rollups: drift of {windows} windows ({drift_days} days, {drift_hours} hours) in {drift_s:.1f} s"
    )
    return {
        "stale": stale,
        "stale_left": left,
        "python_hours": sample.hours if sample else 0,
        "python_rows": python_rows,
        "python_s": python_s,
        "python_full_s": python_full_s,
        "hours": rebuilt.hours,
        "days": rebuilt.days,
        "quality_s": quality_s,
        "drift_windows": windows,
        "drift_s": drift_s,
    }


# ---------------------------------------------------------------------------------------------
# Pages


def time_page(client, url: str, repeats: int, slow_page_s: float) -> dict:
    from django.db import connection

    queries = []

    def count(execute, sql, params, many, context):
        queries.append(sql)
        return execute(sql, params, many, context)

    # An execute wrapper, not CaptureQueriesContext: the test client closes the connection at
    # the end of each request (CONN_MAX_AGE 0) and the reconnect clears connection.queries.
    with connection.execute_wrapper(count):
        began = time.perf_counter()
        response = client.get(url)
        warm_ms = (time.perf_counter() - began) * 1000
    if response.status_code != 200:
        raise SystemExit(f"GET {url} answered {response.status_code}")
    times = [warm_ms]
    if warm_ms <= slow_page_s * 1000:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            response = client.get(url)
            times.append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200
    return {
        "url": url,
        "warm_ms": warm_ms,
        "times": times,
        "median_ms": statistics.median(times),
        "queries": len(queries),
        "bytes": len(response.content),
    }


def measure_pages(fixture: dict, repeats: int, slow_page_s: float) -> dict:
    from django.test import Client
    from django.urls import reverse

    client = Client(HTTP_HOST="localhost")
    client.force_login(fixture["manager"])
    version_url = reverse("monitoring:endpoint", args=[fixture["endpoint"].name])
    pages = {
        "version": version_url,  # the default: 90 days of day windows here
        "overview": reverse("home"),
        "version-hours": version_url + "?window=hour&days=31",  # the most hour windows allowed
    }
    out = {}
    for name, url in pages.items():
        out[name] = page = time_page(client, url, repeats, slow_page_s)
        runs = ", ".join(f"{t:.1f}" for t in page["times"])
        log(
            f"page {name} {url}: warm-up {page['warm_ms']:.1f} ms, runs [{runs}] ms, "
            f"median {page['median_ms']:.1f} ms, {page['queries']} queries, "
            f"{page['bytes']:,} bytes"
        )
    return out


# ---------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> tuple[dict, int]:
    """The whole benchmark; returns (results, exit status). Used by the smoke test too."""
    log(f"load: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    disk = shutil.disk_usage(ROOT)
    log(f"disk: {disk.free / 2**30:.1f} GiB free on {ROOT}")
    needed = args.rows * 1.6e3  # bytes per row, table + indexes + ground truth, measured
    if not args.reuse and needed > disk.free * 0.8:
        raise SystemExit(f"not enough disk for {args.rows:,} rows (~{needed / 2**30:.0f} GiB)")
    var_dir = ROOT / "var" / args.var_name
    began = time.perf_counter()
    setup_django(args.pg, args.database, var_dir, fresh=not args.reuse)
    filled = rolled = pages = None
    try:
        from django.utils import timezone

        if args.reuse:
            fixture, end, rows = load_fixture()
            log(f"reuse: database {args.database} with {rows:,} rows up to {end:%Y-%m-%d %H:%M}")
        else:
            end = timezone.now().replace(second=0, microsecond=0) - timedelta(minutes=1)
            start = end - timedelta(days=args.days)
            fixture = build_fixture(start, end)
            log(
                f"setup: database {args.database}, {len(fixture['versions'])} versions, "
                f"endpoint {fixture['endpoint'].name}, in {time.perf_counter() - began:.1f} s"
            )
            filled = fill(fixture, args.rows, args.days, end)
            rows = args.rows
            log(
                f"fill: {filled['rows']:,} rows + {filled['labels']:,} labels + "
                f"{filled['errors']:,} errors in {filled['total_s']:.1f} s (log "
                f"{filled['log_s']:.1f} s, labels {filled['labels_s']:.1f} s, indexes "
                f"{filled['indexes_s']:.1f} s, vacuum/analyze {filled['analyze_s']:.1f} s); "
                f"prediction log {filled['size']}"
            )
        fixture["rows"] = rows
        if not args.skip_rollups:
            rolled = refresh_rollups(
                fixture, args.python_hours, args.drift_days, args.drift_hours, end
            )
            log(
                f"rollups: {rolled['hours']:,} hour and {rolled['days']} day rollups in "
                f"{rolled['quality_s']:.1f} s (set-based); Python path estimated "
                f"{rolled['python_full_s'] / 60:.1f} min; {rolled['drift_windows']} drift "
                f"windows in {rolled['drift_s']:.1f} s; {rolled['stale_left']} stale marks left"
            )
        if args.skip_pages:
            log("pages: not measured (--skip-pages)")
        else:
            pages = measure_pages(fixture, args.repeats, args.slow_page)
    finally:
        if args.keep:
            log(f"kept database {args.database} and {var_dir}")
        else:
            drop_database(args.pg, args.database)
            shutil.rmtree(var_dir, ignore_errors=True)
    if pages is None:
        log("dashboard: version_ms=nan overview_ms=nan queries=0")
        return {"fill": filled, "rollups": rolled, "pages": None}, 0
    version_ms = pages["version"]["median_ms"]
    overview_ms = pages["overview"]["median_ms"]
    queries = max(page["queries"] for page in pages.values())
    missed = [
        f"{name} page {page['median_ms']:.1f} ms > {TARGET_MS:.0f} ms"
        for name, page in pages.items()
        if page["median_ms"] > TARGET_MS
    ]
    log("targets: " + ("met" if not missed else "; ".join(missed)))
    log(f"dashboard: version_ms={version_ms:.1f} overview_ms={overview_ms:.1f} queries={queries}")
    results = {"fill": filled, "rollups": rolled, "pages": pages}
    return results, 1 if args.strict and missed else 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--python-hours", type=int, default=200, help="hours timed on the Python rollup path"
    )
    parser.add_argument("--drift-hours", type=int, default=0, help="hour windows with drift")
    parser.add_argument("--drift-days", type=int, default=14, help="day windows with drift")
    parser.add_argument("--slow-page", type=float, default=20.0, help="seconds: time once")
    parser.add_argument("--pg", default="postgres://postgres@127.0.0.1:5432")
    parser.add_argument("--database", default="rollgate_bench")
    parser.add_argument("--var-name", default="bench-dashboard", help="folder under var/")
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    parser.add_argument(
        "--reuse", action="store_true", help="measure a kept database again (no setup, no fill)"
    )
    parser.add_argument("--skip-rollups", action="store_true", help="with --reuse")
    parser.add_argument("--skip-pages", action="store_true", help="fill and roll up only")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    return parser.parse_args(argv)


def main() -> int:
    _, status = run(parse_args())
    return status


if __name__ == "__main__":
    sys.exit(main())

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import requests
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from registry.demo_models import breast_cancer_split

CREDENTIALS = Path(settings.VAR_DIR) / "demo-credentials.json"


def replay(
    *,
    url: str,
    endpoint: str,
    api_key: str,
    rows: int | None = None,
    offset: int = 0,
    batch_size: int = 1,
    send_labels: bool = True,
    timeout_s: float = 30.0,
) -> dict[str, int]:
    """Send held-out rows of the breast-cancer split to ``endpoint`` over HTTP, one request per
    ``batch_size`` rows, then post their true labels to ``/api/feedback``.

    Returns counts: ``sent`` rows, ``errors`` (non-200 answers), ``labeled`` rows, ``correct``
    predictions (as the client sees them).

    Raises:
        requests.RequestException: the portal is unreachable.
    """
    split = breast_cancer_split()
    X = split.X_test.iloc[offset : None if rows is None else offset + rows]
    y = split.y_test.loc[X.index]
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    scoring_url = f"{url.rstrip('/')}/serving/{endpoint}/invocations"
    feedback: list[dict] = []
    counts = {"sent": 0, "errors": 0, "labeled": 0, "correct": 0}
    for start in range(0, len(X), batch_size):
        chunk = X.iloc[start : start + batch_size]
        body = {"dataframe_split": json.loads(chunk.to_json(orient="split", index=False))}
        response = session.post(scoring_url, json=body, timeout=timeout_s)
        counts["sent"] += len(chunk)
        if response.status_code != 200:
            counts["errors"] += 1
            continue
        predictions = response.json()["predictions"]
        labels = [int(v) for v in y.loc[chunk.index]]
        counts["correct"] += sum(int(p == t) for p, t in zip(predictions, labels, strict=True))
        request_id = response.headers["X-Request-Id"]
        feedback.append(
            {"request_id": request_id, "label": labels[0] if len(labels) == 1 else labels}
        )
    if send_labels:
        counts["labeled"] = post_feedback(session, url, feedback, timeout_s=timeout_s)
    return counts


def post_feedback(
    session: requests.Session,
    url: str,
    items: list[dict],
    *,
    timeout_s: float = 30.0,
    retries: int = 5,
) -> int:
    """Post labels to ``/api/feedback`` in chunks of 500; returns how many were accepted.

    The serving log is written in bulk a fraction of a second after each answer, so the labels
    of the last requests may arrive first and come back ``unknown``: those are sent again after
    a second, up to ``retries`` times, as a real client would."""
    accepted = 0
    pending = list(items)
    for attempt in range(retries + 1):
        unknown: set[str] = set()
        for start in range(0, len(pending), 500):
            response = session.post(
                f"{url.rstrip('/')}/api/feedback",
                json=pending[start : start + 500],
                timeout=timeout_s,
            )
            response.raise_for_status()
            accepted += response.json()["accepted"]
            unknown.update(response.json()["unknown"])
        pending = [
            item
            for item in pending
            if str(item.get("request_id", item.get("inference_id"))) in unknown
        ]
        if not pending or attempt == retries:
            break
        time.sleep(1.0)
    return accepted


@dataclass(frozen=True)
class Shift:
    """A change applied to one feature: ``*1.4`` multiplies it, ``+3`` adds to it."""

    feature: str
    op: str
    amount: float

    def apply(self, column: pd.Series, strength: float) -> pd.Series:
        """``column`` shifted by ``strength`` (0: unchanged, 1: the full shift)."""
        if self.op == "*":
            return column * (1 + (self.amount - 1) * strength)
        return column + self.amount * strength


SHIFT_PATTERN = re.compile(r"^(?P<feature>[^=]+)=(?P<op>[*+])(?P<amount>-?[0-9.]+(?:e-?[0-9]+)?)$")


def parse_shift(text: str, features: list[str]) -> Shift:
    """``"mean radius=*1.4"`` or ``"mean texture=+3"`` → :class:`Shift`.

    Raises:
        ValueError: the text does not match, or names a feature the model does not have.
    """
    match = SHIFT_PATTERN.match(text.strip())
    if match is None:
        raise ValueError(f"--shift {text!r}: write FEATURE=*FACTOR or FEATURE=+AMOUNT")
    feature = match["feature"].strip()
    if feature not in features:
        raise ValueError(f"--shift {text!r}: no feature named {feature!r}")
    return Shift(feature, match["op"], float(match["amount"]))


def simulate_days(
    *,
    url: str,
    endpoint: str,
    api_key: str,
    days: int,
    rows_per_day: int,
    shifts: list[Shift],
    shift_from_day: int,
    label_share: float = 0.8,
    seed: int = 0,
    timeout_s: float = 30.0,
    log_wait_s: float = 30.0,
) -> dict[str, int]:
    """Replay ``days`` simulated calendar days (UTC) of traffic ending yesterday: each day, ``rows_per_day``
    held-out rows drawn with replacement, one per request, sent over HTTP (so they are
    validated, scored and logged by the real serving path). From day ``shift_from_day`` on
    (0 is the oldest) the ``shifts`` ramp up linearly to full strength on the last day: a drift
    episode. ``label_share`` of the rows get their true label by ``X-Inference-Id``.

    The serving log stamps rows with the time they arrived; this demo then moves each day's
    rows to that simulated day (a direct update of the log, the one thing here that no real
    client could do) and marks the windows stale so the rollups and drift are recomputed.

    Returns counts: ``sent``, ``errors``, ``labeled``, ``moved`` log rows.

    Raises:
        requests.RequestException: the portal is unreachable.
        CommandError: the logged rows did not appear within ``log_wait_s``.
    """
    from monitoring.rollups import windows_mark_stale
    from rollouts.models import PredictionLog

    split = breast_cancer_split()
    rng = np.random.default_rng(seed)
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {api_key}"
    base = url.rstrip("/")
    today = timezone.now().replace(hour=0, minute=0, second=0, microsecond=0)
    counts = {"sent": 0, "errors": 0, "labeled": 0, "moved": 0}
    sent_at: dict[str, object] = {}
    feedback: list[dict] = []
    for day in range(days):
        picks = rng.integers(0, len(split.X_test), rows_per_day)
        X = split.X_test.iloc[picks].reset_index(drop=True)
        y = split.y_test.iloc[picks].reset_index(drop=True)
        if shifts and day >= shift_from_day:
            strength = (day - shift_from_day + 1) / (days - shift_from_day)
            for shift in shifts:
                X[shift.feature] = shift.apply(X[shift.feature], strength)
        day_start = today - timedelta(days=days - day)  # the last simulated day is yesterday
        for i in range(len(X)):
            inference_id = f"sim-{day_start:%Y%m%d}-{seed}-{i}"
            body = {"dataframe_split": json.loads(X.iloc[[i]].to_json(orient="split", index=False))}
            response = session.post(
                f"{base}/serving/{endpoint}/invocations",
                json=body,
                headers={"X-Inference-Id": inference_id},
                timeout=timeout_s,
            )
            counts["sent"] += 1
            if response.status_code != 200:
                counts["errors"] += 1
                continue
            # spread the day's requests over its 24 hours
            sent_at[response.headers["X-Request-Id"]] = day_start + timedelta(
                hours=24 * (i + 0.5) / len(X)
            )
            if rng.random() < label_share:
                feedback.append({"inference_id": inference_id, "label": int(y.iloc[i])})

    deadline = time.monotonic() + log_wait_s
    while PredictionLog.objects.filter(request_id__in=list(sent_at)).count() < len(sent_at):
        if time.monotonic() > deadline:
            raise CommandError("the serving log did not record every request in time")
        time.sleep(0.5)
    moved_from = set(
        PredictionLog.objects.filter(request_id__in=list(sent_at)).values_list(
            "endpoint_id", "model_version_id", "created_at"
        )
    )
    keys = set()
    for request_id, when in sent_at.items():
        rows = PredictionLog.objects.filter(request_id=request_id)
        counts["moved"] += rows.update(created_at=when)
        keys.update(rows.values_list("endpoint_id", "model_version_id", "created_at"))
    windows_mark_stale(moved_from | keys)
    counts["labeled"] = post_feedback(session, base, feedback, timeout_s=timeout_s)
    return counts


class Command(BaseCommand):
    help = (
        "Replay rows of the breast-cancer held-out split against an endpoint over HTTP and post "
        "their true labels as feedback. Defaults come from var/demo-credentials.json."
    )

    def add_arguments(self, parser):
        parser.add_argument("--url", help="portal base URL, e.g. http://127.0.0.1:8000")
        parser.add_argument("--endpoint", help="endpoint name")
        parser.add_argument("--api-key", help="serving API key scoped to the endpoint")
        parser.add_argument(
            "--rows", type=int, default=None, help="how many rows (default: all 171)"
        )
        parser.add_argument("--offset", type=int, default=0, help="first held-out row to send")
        parser.add_argument("--batch-size", type=int, default=1, help="rows per request")
        parser.add_argument("--no-labels", action="store_true", help="do not post ground truth")
        parser.add_argument(
            "--days",
            type=int,
            default=0,
            help="simulate this many days of traffic ending yesterday instead of one replay",
        )
        parser.add_argument("--rows-per-day", type=int, default=60, help="with --days")
        parser.add_argument(
            "--shift",
            action="append",
            default=[],
            metavar="FEATURE=*FACTOR|FEATURE=+AMOUNT",
            help="with --days: shift a feature, ramping up from --shift-from-day (repeatable)",
        )
        parser.add_argument(
            "--shift-from-day", type=int, default=None, help="first shifted day (default: half)"
        )
        parser.add_argument("--seed", type=int, default=0, help="with --days: random seed")

    def handle(self, *args, **opts):
        defaults = json.loads(CREDENTIALS.read_text()) if CREDENTIALS.exists() else {}
        url = opts["url"] or defaults.get("url")
        endpoint = opts["endpoint"] or defaults.get("endpoint")
        api_key = opts["api_key"] or defaults.get("api_key")
        if not (url and endpoint and api_key):
            raise CommandError("give --url, --endpoint and --api-key (or run `make demo` first)")
        if opts["batch_size"] < 1 or (opts["rows"] is not None and opts["rows"] < 1):
            raise CommandError("--rows and --batch-size must be at least 1")
        started = time.perf_counter()
        if opts["days"]:
            return self._simulate(url, endpoint, api_key, opts, started)
        try:
            counts = replay(
                url=url,
                endpoint=endpoint,
                api_key=api_key,
                rows=opts["rows"],
                offset=opts["offset"],
                batch_size=opts["batch_size"],
                send_labels=not opts["no_labels"],
            )
        except requests.RequestException as exc:
            raise CommandError(f"cannot reach the portal at {url}: {exc}") from exc
        elapsed = time.perf_counter() - started
        self.stdout.write(
            f"replayed {counts['sent']} rows to {endpoint} in {elapsed:.1f}s: "
            f"{counts['errors']} errors, {counts['labeled']} labels posted, "
            f"{counts['correct']} predictions correct"
        )
        if counts["errors"]:
            raise CommandError(f"{counts['errors']} requests failed")

    def _simulate(self, url: str, endpoint: str, api_key: str, opts: dict, started: float) -> None:
        days = opts["days"]
        features = list(breast_cancer_split().X_test.columns)
        try:
            shifts = [parse_shift(text, features) for text in opts["shift"]]
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        shift_from = days // 2 if opts["shift_from_day"] is None else opts["shift_from_day"]
        if days < 1 or opts["rows_per_day"] < 1:
            raise CommandError("--days and --rows-per-day must be at least 1")
        if not 0 <= shift_from < days:
            raise CommandError(f"--shift-from-day must be between 0 and {days - 1}")
        try:
            counts = simulate_days(
                url=url,
                endpoint=endpoint,
                api_key=api_key,
                days=days,
                rows_per_day=opts["rows_per_day"],
                shifts=shifts,
                shift_from_day=shift_from,
                seed=opts["seed"],
            )
        except requests.RequestException as exc:
            raise CommandError(f"cannot reach the portal at {url}: {exc}") from exc
        self.stdout.write(
            f"simulated {days} days ({counts['sent']} requests, {counts['errors']} errors, "
            f"{counts['labeled']} labels) on {endpoint} in {time.perf_counter() - started:.1f}s; "
            f"shifted from day {shift_from}: {', '.join(opts['shift']) or 'nothing'}"
        )
        if counts["errors"]:
            raise CommandError(f"{counts['errors']} requests failed")

from __future__ import annotations

import json
import time
from pathlib import Path

import requests
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

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
        for start in range(0, len(feedback), 500):
            response = session.post(
                f"{url.rstrip('/')}/api/feedback",
                json=feedback[start : start + 500],
                timeout=timeout_s,
            )
            response.raise_for_status()
            counts["labeled"] += response.json()["accepted"]
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

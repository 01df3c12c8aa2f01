"""Benchmark: Rollgate's drift engine against Evidently's data-drift preset on the same data.

    .venv/bin/python benchmarks/drift.py [--rows 1000000] [--reference-rows 100000] [--features 20]

Generates a seeded reference (100,000 × 20) and current window (1,000,000 × 20, four features
shifted), times ``prepare_reference`` + ``compute_drift`` (best of 3), then runs Evidently 0.7.23's
``Report([DataDriftPreset()])`` on the same arrays in its own virtual environment: Evidently needs
pandas < 3, which cannot share Rollgate's environment. That environment is created once with
``python3 -m venv`` under ``var/bench-evidently-venv/`` (git-ignored) and reused. Both timings
exclude building the inputs (column arrays for Rollgate, DataFrames for Evidently).

The last line is always ``drift: rollgate_s=<a> evidently_s=<b> ratio=<b/a>``; when Evidently
cannot be installed or run, the reason is printed, ``b`` and the ratio are ``nan`` and the exit
status is 1. Targets (Rollgate ≤ 2 s, ratio ≥ 50) are reported; ``--strict`` also makes a missed
target exit 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from monitoring.drift import compute_drift, prepare_reference  # noqa: E402

EVIDENTLY_VERSION = "0.7.23"
EVIDENTLY_VENV = ROOT / "var" / "bench-evidently-venv"
SEED = 20250605
SHIFTED = {0: (0.3, 1.0), 1: (0.0, 1.5), 2: (0.15, 1.1), 3: (1.0, 1.0)}  # index: (mean, scale)

EVIDENTLY_RUNNER = r"""
import json, sys, time
import numpy as np
import pandas as pd
from evidently import Report
from evidently.presets import DataDriftPreset

folder = sys.argv[1]
reference = np.load(f"{folder}/reference.npy")
current = np.load(f"{folder}/current.npy")
names = [f"f{i:02d}" for i in range(reference.shape[1])]
reference = pd.DataFrame(reference, columns=names)
current = pd.DataFrame(current, columns=names)
start = time.perf_counter()
snapshot = Report([DataDriftPreset()]).run(current_data=current, reference_data=reference)
seconds = time.perf_counter() - start
values = {}
for metric in snapshot.dict()["metrics"]:
    config = metric.get("config", {})
    if config.get("type", "").endswith("ValueDrift"):
        values[config["column"]] = [config.get("method"), float(metric["value"])]
    elif config.get("type", "").endswith("DriftedColumnsCount"):
        values["_drifted"] = metric["value"]
print(json.dumps({"seconds": seconds, "values": values}, default=float))
"""


def make_data(rows: int, reference_rows: int, features: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    reference = rng.standard_normal((reference_rows, features))
    current = rng.standard_normal((rows, features))
    for index, (mean, scale) in SHIFTED.items():
        if index < features:
            current[:, index] = current[:, index] * scale + mean
    return reference, current


def time_rollgate(reference: np.ndarray, current: np.ndarray, repeats: int):
    names = [f"f{i:02d}" for i in range(reference.shape[1])]
    ref_columns = {n: np.ascontiguousarray(reference[:, i]) for i, n in enumerate(names)}
    cur_columns = {n: np.ascontiguousarray(current[:, i]) for i, n in enumerate(names)}
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        prepared = prepare_reference(ref_columns)
        result = compute_drift(prepared, cur_columns)
        times.append(time.perf_counter() - start)
    return times, result


def ensure_evidently() -> tuple[Path | None, str]:
    """Return (python of the Evidently venv, "") or (None, reason)."""
    python = EVIDENTLY_VENV / "bin" / "python"
    check = [
        str(python),
        "-c",
        f"import evidently, pandas; assert evidently.__version__ == {EVIDENTLY_VERSION!r}",
    ]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, ""
    base = shutil.which("python3")
    if base is None:
        return None, "python3 is not on PATH"
    print(f"creating {EVIDENTLY_VENV} (once) and installing evidently=={EVIDENTLY_VERSION} …")
    shutil.rmtree(EVIDENTLY_VENV, ignore_errors=True)
    steps = [
        [base, "-m", "venv", str(EVIDENTLY_VENV)],
        [str(python), "-m", "pip", "install", "-q", f"evidently=={EVIDENTLY_VERSION}", "pandas<3"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            return None, f"{' '.join(step[:4])} failed: " + " | ".join(tail)
    if subprocess.run(check, capture_output=True).returncode != 0:
        return None, "evidently was installed but does not import"
    return python, ""


def time_evidently(python: Path, reference: np.ndarray, current: np.ndarray, timeout: float):
    with tempfile.TemporaryDirectory(prefix="rg-bench-drift-") as folder:
        np.save(Path(folder) / "reference.npy", reference)
        np.save(Path(folder) / "current.npy", current)
        runner = Path(folder) / "run_evidently.py"
        runner.write_text(EVIDENTLY_RUNNER)
        env = {**os.environ, "DO_NOT_TRACK": "1", "EVIDENTLY_DISABLE_TELEMETRY": "1"}
        try:
            done = subprocess.run(
                [str(python), str(runner), folder],
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
            )
        except subprocess.TimeoutExpired:
            return None, f"Evidently did not finish within {timeout:.0f} s"
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-5:]
        return None, "Evidently failed: " + " | ".join(tail)
    return json.loads(done.stdout.strip().splitlines()[-1]), ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reference-rows", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()

    reference, current = make_data(args.rows, args.reference_rows, args.features)
    print(
        f"data: reference {reference.shape[0]:,} × {reference.shape[1]}, "
        f"current {current.shape[0]:,} × {current.shape[1]}, seed {SEED}, "
        f"shifted features {sorted(SHIFTED)}, {os.cpu_count()} CPUs"
    )
    times, result = time_rollgate(reference, current, args.repeats)
    rollgate_s = min(times)
    print(f"rollgate: {', '.join(f'{t:.3f}' for t in times)} s (best {rollgate_s:.3f} s)")
    drifted = [f.name for f in result.features if f.drifted]
    print(f"rollgate: drifted {drifted}, share {result.share_drifted:.2f}")

    evidently_s = math.nan
    python, reason = ensure_evidently()
    outcome = None
    if python is not None:
        outcome, reason = time_evidently(python, reference, current, args.timeout)
    if outcome is None:
        print(f"evidently: not measured: {reason}")
    else:
        evidently_s = float(outcome["seconds"])
        values = outcome["values"]
        print(f"evidently: {evidently_s:.3f} s, drifted columns {values.get('_drifted')}")
        gaps = [
            abs(values[f.name][1] - f.wasserstein_normalised)
            for f in result.features
            if f.name in values
            and values[f.name][0].startswith("Wasserstein")
            and f.wasserstein_normalised is not None
        ]
        if gaps:
            print(f"check: max |Wasserstein/σ rollgate - evidently| = {max(gaps):.2e}")

    ratio = evidently_s / rollgate_s
    missed = []
    if rollgate_s > 2.0:
        missed.append(f"Rollgate took {rollgate_s:.3f} s > 2 s")
    if not ratio >= 50:
        missed.append(f"ratio {ratio:.2f} < 50")
    print("targets: " + ("met" if not missed else "; ".join(missed)))
    print(f"drift: rollgate_s={rollgate_s:.3f} evidently_s={evidently_s:.3f} ratio={ratio:.2f}")
    if outcome is None:
        return 1
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())

"""The demo's drift episode: simulated days of real held-out rows sent over HTTP, one feature
shifted from a chosen day on, labels posted by the client's inference id; the rollups then show
the shift as drift on the late days only, and the labels as coverage."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command

from monitoring import rollups
from monitoring.models import DriftRollup, Rollup
from portal.management.commands.replay_traffic import Shift, parse_shift, simulate_days
from rollouts.models import PredictionLog
from rollouts.services import api_key_create

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True, serialized_rollback=True)]


def test_shifted_days_drift_and_earlier_days_do_not(live_server, synced, deploy, platform_admin):
    v1, _ = synced
    req = deploy(v1, "staging")
    assert req.status == "live", req.status_reason
    _, key = api_key_create(name="sim", endpoints=[req.endpoint], created_by=platform_admin)

    counts = simulate_days(
        url=live_server.url,
        endpoint=req.endpoint.name,
        api_key=key,
        days=4,
        rows_per_day=150,
        shifts=[Shift("mean radius", "*", 2.0)],
        shift_from_day=2,
        label_share=1.0,
    )
    rollups.rollups_refresh()

    assert counts == {"sent": 600, "errors": 0, "labeled": 600, "moved": 600}
    days = list(
        DriftRollup.objects.filter(endpoint=req.endpoint, granularity="day").order_by(
            "window_start"
        )
    )
    assert len(days) == 4
    radius = [next(f for f in d.result["features"] if f["name"] == "mean radius") for d in days]
    assert all(r["psi"] < 0.25 for r in radius[:2])  # unshifted days: no PSI drift
    assert radius[3]["status"] == "drift" and radius[3]["psi"] >= 0.25  # full shift (x2)
    assert radius[3]["psi"] > radius[2]["psi"] > radius[0]["psi"]  # the shift ramps up
    quality = Rollup.objects.filter(endpoint=req.endpoint, granularity="day")
    assert sum(r.rows for r in quality) == 600 == sum(r.labeled for r in quality)
    assert PredictionLog.objects.filter(inference_id__startswith="sim-").count() == 600


def test_bad_shift_arguments_are_refused_with_the_reason():
    features = ["mean radius"]
    assert parse_shift("mean radius=*1.5", features) == Shift("mean radius", "*", 1.5)
    assert parse_shift("mean radius=+-2", features) == Shift("mean radius", "+", -2.0)
    with pytest.raises(ValueError, match="no feature named 'radius'"):
        parse_shift("radius=*2", features)
    with pytest.raises(ValueError, match="FEATURE=\\*FACTOR"):
        parse_shift("mean radius*2", features)
    with pytest.raises(CommandError, match="shift-from-day must be between 0 and 2"):
        call_command(
            "replay_traffic",
            "--url=http://127.0.0.1:9",
            "--endpoint=e",
            "--api-key=k",
            "--days=3",
            "--shift-from-day=5",
        )

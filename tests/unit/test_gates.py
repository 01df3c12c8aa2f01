"""Automated gates and the evidence they leave: the signature diff they rely on (pure
functions), each gate passing and failing on a real MLflow version, and the artifact digest
that binds the evidence to what is approved."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest

from portal.models import AuditEvent
from registry import mlflow_client
from registry.compare import signature_diff
from rollouts import gates, services
from rollouts.models import DeploymentRequest, Environment, GateResult, Review

Status = DeploymentRequest.Status


def _sig(*columns: tuple[str, str] | tuple[str, str, bool]) -> dict:
    return {
        "inputs": [
            {"name": c[0], "type": c[1], "required": c[2] if len(c) > 2 else True} for c in columns
        ],
        "outputs": [{"type": "long"}],
    }


def _change(diff, name: str):
    return next(c for c in diff.changes if c.name == name)


# --- signature diff (registry/compare.py) ----------------------------------------------------


def test_identical_signatures_have_no_changes():
    diff = signature_diff(_sig(("a", "double")), _sig(("a", "double")))
    assert diff.changes == [] and diff.compatible and not diff.outputs_changed


def test_added_required_column_is_breaking():
    diff = signature_diff(_sig(("a", "double")), _sig(("a", "double"), ("b", "double")))
    change = _change(diff, "b")
    assert (change.change, change.old, change.new, change.breaking) == (
        "added",
        None,
        "double",
        True,
    )
    assert not diff.compatible


def test_added_optional_column_is_compatible():
    diff = signature_diff(_sig(("a", "double")), _sig(("a", "double"), ("b", "double", False)))
    assert _change(diff, "b").change == "added" and not _change(diff, "b").breaking
    assert diff.compatible


def test_removed_column_is_breaking():
    diff = signature_diff(_sig(("a", "double"), ("b", "double")), _sig(("a", "double")))
    change = _change(diff, "b")
    assert (change.change, change.old, change.new, change.breaking) == (
        "removed",
        "double",
        None,
        True,
    )
    assert not diff.compatible


@pytest.mark.parametrize(
    ("old", "new", "breaking"),
    [
        ("integer", "long", False),
        ("integer", "double", False),
        ("float", "double", False),
        ("long", "double", False),
        ("double", "integer", True),
        ("double", "float", True),
        ("long", "integer", True),
        ("string", "double", True),
    ],
)
def test_type_changes_widening_ok_narrowing_breaking(old, new, breaking):
    diff = signature_diff(_sig(("x", old)), _sig(("x", new)))
    change = _change(diff, "x")
    assert (change.change, change.old, change.new, change.breaking) == ("type", old, new, breaking)
    assert diff.compatible is not breaking


def test_optional_column_becoming_required_is_breaking():
    diff = signature_diff(_sig(("x", "double", False)), _sig(("x", "double", True)))
    assert _change(diff, "x").change == "required" and not diff.compatible


def test_diff_as_dict_lists_every_change_for_the_page():
    diff = signature_diff(
        _sig(("a", "integer"), ("gone", "string")), _sig(("a", "long"), ("new", "double"))
    )
    data = diff.as_dict()
    assert data["compatible"] is False
    assert {(c["name"], c["change"], c["breaking"]) for c in data["changes"]} == {
        ("a", "type", False),
        ("new", "added", True),
        ("gone", "removed", True),
    }


# --- gates on the real MLflow versions -------------------------------------------------------


@pytest.fixture
def staging(db):
    return Environment.objects.get(name="staging")


def _set_policy(env: Environment, **changes) -> Environment:
    Environment.objects.filter(pk=env.pk).update(**changes)
    env.refresh_from_db()
    return env


def test_passing_gates_store_five_results_bound_to_the_digest(synced, awaiting_review):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    assert req.status == Status.AWAITING_REVIEW, req.status_reason
    results = list(GateResult.objects.filter(request=req))
    assert [r.name for r in results] == list(gates.ALL_GATES)
    assert all(r.passed for r in results)
    assert len(req.artifact_digest) == 64
    assert {r.artifact_digest for r in results} == {req.artifact_digest}
    assert req.artifact_digest == mlflow_client.artifact_digest(
        v1.registered_model.name, v1.version
    )
    event = AuditEvent.objects.get(action="request.gates_passed", object_id=str(req.pk))
    assert event.after["artifact_digest"] == req.artifact_digest
    assert event.after["gates"] == {name: True for name in gates.ALL_GATES}


def test_input_example_that_fails_the_signature_fails_the_predict_gate(synced, awaiting_review):
    v1, _ = synced
    v1.input_example = {"dataframe_split": {"columns": ["not a feature"], "data": [[1.0]]}}
    v1.save(update_fields=["input_example"])
    req = awaiting_review(v1, "staging")
    assert req.status == Status.GATES_FAILED
    assert gates.PREDICTS_ON_EXAMPLE in req.status_reason
    failed = GateResult.objects.get(request=req, name=gates.PREDICTS_ON_EXAMPLE)
    assert not failed.passed and "signature" in failed.summary
    assert GateResult.objects.get(request=req, name=gates.MODEL_LOADS).passed
    assert (
        AuditEvent.objects.filter(action="request.gates_failed", object_id=str(req.pk)).count() == 1
    )
    assert not Review.objects.exists()


def test_candidate_requiring_a_new_column_fails_the_signature_gate(
    synced, deploy, awaiting_review, staging
):
    v1, v2 = synced
    _set_policy(staging, metric_tolerance=1.0)  # isolate the signature gate
    assert deploy(v1, "staging").status == Status.LIVE
    v2.signature = {
        **v2.signature,
        "inputs": [
            *v2.signature["inputs"],
            {"name": "patient age", "type": "long", "required": True},
        ],
    }
    v2.save(update_fields=["signature"])
    req = awaiting_review(v2, "staging")
    assert req.status == Status.GATES_FAILED
    assert gates.SIGNATURE_COMPATIBLE in req.status_reason
    result = GateResult.objects.get(request=req, name=gates.SIGNATURE_COMPATIBLE)
    assert not result.passed
    assert result.details["champion"] == 1
    assert {
        "name": "patient age",
        "change": "added",
        "old": None,
        "new": "long",
        "breaking": True,
    } in result.details["changes"]


def test_signature_gate_passes_without_champion_and_with_an_identical_one(
    synced, deploy, awaiting_review, staging
):
    v1, v2 = synced
    _set_policy(staging, metric_tolerance=1.0)
    first = awaiting_review(v1, "staging")
    assert (
        GateResult.objects.get(request=first, name=gates.SIGNATURE_COMPATIBLE).summary
        == "no live champion to compare with"
    )
    services.deployment_request_cancel(request_id=first.pk, actor=first.requester)
    deploy(v1, "staging")
    req = awaiting_review(v2, "staging")
    result = GateResult.objects.get(request=req, name=gates.SIGNATURE_COMPATIBLE)
    assert result.passed and result.details["compatible"] and result.details["changes"] == []


@pytest.mark.parametrize(("tolerance", "passes"), [(0.02, False), (0.1, True)])
def test_metrics_gate_applies_the_policy_tolerance(
    synced, deploy, awaiting_review, staging, tolerance, passes
):
    v1, v2 = synced
    _set_policy(staging, metric_tolerance=tolerance)
    assert deploy(v1, "staging").status == Status.LIVE
    # The candidate is 0.05 below the champion on accuracy and equal on the other metrics.
    v2.metrics = {**v1.metrics, "accuracy": v1.metrics["accuracy"] - 0.05}
    v2.save(update_fields=["metrics"])
    req = awaiting_review(v2, "staging")
    result = GateResult.objects.get(request=req, name=gates.METRICS_WITHIN_TOLERANCE)
    assert result.passed is passes
    rows = {row["metric"]: row for row in result.details["metrics"]}
    assert rows["accuracy"]["ok"] is passes and rows["accuracy"]["gated"]
    assert rows["accuracy"]["delta"] == pytest.approx(-0.05)
    assert result.details["tolerance"] == tolerance
    if passes:
        assert req.status == Status.AWAITING_REVIEW
    else:
        assert req.status == Status.GATES_FAILED
        assert gates.METRICS_WITHIN_TOLERANCE in req.status_reason
        assert "accuracy" in result.summary


def test_metrics_gate_fails_when_the_candidate_lacks_a_champion_metric(synced):
    v1, v2 = synced
    v2.metrics = {k: v for k, v in v1.metrics.items() if k != "recall"}
    outcome = gates._metrics_within_tolerance(v2, v1, 0.5)
    assert not outcome.passed and "recall" in outcome.summary


def test_only_the_policy_gates_run(synced, awaiting_review, staging):
    v1, _ = synced
    _set_policy(staging, gates=[gates.PREDICTS_ON_EXAMPLE, gates.DIGEST_STABLE])
    req = awaiting_review(v1, "staging")
    # Predicting needs the loaded model, so model_loads runs too.
    assert list(req.gate_results.values_list("name", flat=True)) == [
        gates.MODEL_LOADS,
        gates.PREDICTS_ON_EXAMPLE,
        gates.DIGEST_STABLE,
    ]
    assert req.status == Status.AWAITING_REVIEW


def test_digest_gate_fails_when_artifacts_change_while_gates_run(synced, monkeypatch):
    v1, _ = synced
    digests = iter(["a" * 64, "b" * 64])
    monkeypatch.setattr(mlflow_client, "artifact_digest", lambda name, version: next(digests))
    run = gates.run_gates(v1, None, gates=[gates.DIGEST_STABLE])
    (outcome,) = run.outcomes
    assert not outcome.passed and outcome.details == {"before": "a" * 64, "after": "b" * 64}
    assert run.artifact_digest == "a" * 64 and not run.passed


def test_unreadable_artifacts_fail_the_request_not_the_task(synced, awaiting_review, monkeypatch):
    v1, _ = synced

    def unreadable(name, version):
        raise mlflow_client.RegistryError("artifact store is down")

    monkeypatch.setattr(mlflow_client, "artifact_digest", unreadable)
    req = awaiting_review(v1, "staging")
    assert req.status == Status.GATES_FAILED
    assert "artifact store is down" in req.gate_results.get().summary


# --- the digest binds the evidence to what is approved ---------------------------------------


def _artifact_dir(mv) -> Path:
    location = urlparse(mv.storage_location)
    assert location.scheme == "file", mv.storage_location
    path = Path(location.path)
    assert path.is_dir(), path
    return path


def test_approval_refused_when_artifacts_changed_after_the_gates(synced, awaiting_review, reviewer):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    assert req.status == Status.AWAITING_REVIEW
    events_before = AuditEvent.objects.count()
    extra = _artifact_dir(v1) / "tampered.txt"
    extra.write_text("swapped after the gates ran\n")
    try:
        assert (
            mlflow_client.artifact_digest(v1.registered_model.name, v1.version)
            != req.artifact_digest
        )
        with pytest.raises(services.ArtifactChanged, match="changed after its gates ran"):
            services.deployment_request_approve(request_id=req.pk, reviewer=reviewer)
    finally:
        extra.unlink()
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert not Review.objects.filter(request=req).exists()
    assert AuditEvent.objects.count() == events_before


def test_approval_of_changed_artifacts_is_409_through_the_page(
    synced, awaiting_review, reviewer, client, monkeypatch
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")
    events_before = AuditEvent.objects.count()
    monkeypatch.setattr(mlflow_client, "artifact_digest", lambda name, version: "f" * 64)
    client.force_login(reviewer)
    response = client.post(f"/rollouts/requests/{req.pk}/approve", {"comment": "lgtm"})
    assert response.status_code == 409
    assert "changed after its gates ran" in response.content.decode()
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW
    assert not Review.objects.filter(request=req).exists()
    assert AuditEvent.objects.count() == events_before


def test_unreachable_mlflow_at_approval_is_503_and_changes_nothing(
    synced, awaiting_review, reviewer, client, monkeypatch
):
    v1, _ = synced
    req = awaiting_review(v1, "staging")

    def unreachable(name, version):
        raise mlflow_client.RegistryError("connection refused")

    monkeypatch.setattr(mlflow_client, "artifact_digest", unreachable)
    client.force_login(reviewer)
    response = client.post(f"/rollouts/requests/{req.pk}/approve", {})
    assert response.status_code == 503
    req.refresh_from_db()
    assert req.status == Status.AWAITING_REVIEW and not req.reviews.exists()

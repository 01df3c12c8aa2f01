from __future__ import annotations

import pytest

from rollouts.models import DeploymentRequest


@pytest.mark.django_db
def test_synced_versions_have_signature_and_example(synced, team):
    v1, v2 = synced
    assert v1.registered_model.team == team  # the MLflow tag "team" names the owner
    assert v1.version == 1 and v2.version == 2
    assert len(v1.input_columns) == 30
    assert "dataframe_split" in v1.input_example
    assert set(v1.metrics) >= {"accuracy", "precision", "recall", "f1", "roc_auc"}


def test_transition_table_covers_every_status():
    Status = DeploymentRequest.Status
    assert set(DeploymentRequest.TRANSITIONS) == set(Status.values)
    # A request starts with its gates pending; open and finished requests never overlap.
    assert DeploymentRequest._meta.get_field("status").default == Status.PENDING_GATES
    assert DeploymentRequest.UNDECIDED <= DeploymentRequest.ACTIVE
    assert DeploymentRequest.ACTIVE.isdisjoint(DeploymentRequest.TERMINAL)

from __future__ import annotations

import pytest

from rollouts.models import DeploymentRequest


@pytest.mark.django_db
def test_synced_versions_have_signature_and_example(synced):
    v1, v2 = synced
    assert v1.version == 1 and v2.version == 2
    assert len(v1.input_columns) == 30
    assert "dataframe_split" in v1.input_example
    assert set(v1.metrics) >= {"accuracy", "precision", "recall", "f1", "roc_auc"}


def test_transition_table_covers_every_status():
    assert set(DeploymentRequest.TRANSITIONS) == set(DeploymentRequest.Status.values)

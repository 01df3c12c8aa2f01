"""Roll back to any version that was live on the endpoint before (issue 10 point 3): no
approval, reviewers and platform admins only, audited; a version never live there is a 409."""

from __future__ import annotations

import pytest
from django.core.exceptions import PermissionDenied
from rest_framework.test import APIClient

from portal.errors import Conflict
from portal.models import AuditEvent
from rollouts import selectors, services
from rollouts.models import Deployment, DeploymentRequest

Status = DeploymentRequest.Status


@pytest.fixture
def two_releases(synced, deploy):
    from rollouts.models import Environment

    Environment.objects.filter(name="staging").update(metric_tolerance=1.0)
    v1, v2 = synced
    first = deploy(v1, "staging")
    second = deploy(v2, "staging")
    assert (first.status, second.status) == ("live", "live")
    first.refresh_from_db()
    return first, second


def test_a_version_live_before_is_restored_by_number(two_releases, reviewer):
    first, second = two_releases
    assert selectors.restorable_versions(second.endpoint) == [1]
    restored = services.deployment_rollback(
        endpoint_id=second.endpoint_id, actor=reviewer, reason="v2 drifts", to_version=1
    )
    assert restored.pk == first.pk and restored.status == Status.LIVE
    second.refresh_from_db()
    assert second.status == Status.ROLLED_BACK
    live = Deployment.objects.get(endpoint=second.endpoint, status=Deployment.Status.LIVE)
    assert (live.model_version.version, live.traffic_weight, live.role) == (1, 100, "stable")
    assert AuditEvent.objects.filter(action="deployment.restored", actor=reviewer).exists()
    assert selectors.restorable_versions(second.endpoint) == []  # v2 was rolled back


@pytest.mark.parametrize(("version", "message"), [(2, "serves already"), (7, "never live")])
def test_a_version_not_restorable_is_a_conflict_and_changes_nothing(
    two_releases, reviewer, version, message
):
    _, second = two_releases
    events = AuditEvent.objects.count()
    with pytest.raises(Conflict, match=message):
        services.deployment_rollback(
            endpoint_id=second.endpoint_id, actor=reviewer, reason="r", to_version=version
        )
    assert AuditEvent.objects.count() == events
    second.refresh_from_db()
    assert second.status == Status.LIVE


def test_only_reviewers_and_platform_admins_roll_back(two_releases, data_scientist):
    _, second = two_releases
    with pytest.raises(PermissionDenied):
        services.deployment_rollback(
            endpoint_id=second.endpoint_id, actor=data_scientist, reason="r", to_version=1
        )


def test_the_api_and_the_page_take_a_version(two_releases, reviewer, client):
    _, second = two_releases
    api = APIClient()
    api.force_authenticate(reviewer)
    url = f"/api/endpoints/{second.endpoint.name}/rollback"
    assert api.post(url, {"reason": "r", "version": 9}, format="json").status_code == 409
    assert api.post(url, {"reason": "r", "version": 0}, format="json").status_code == 400
    assert api.post(url, {"reason": "r", "version": "x"}, format="json").status_code == 400
    client.force_login(reviewer)
    page = client.get(f"/rollouts/endpoints/{second.endpoint.name}/timeline")
    assert '<option value="1">v1</option>' in page.content.decode()
    form = f"/rollouts/endpoints/{second.endpoint.name}/rollback"
    assert client.post(form, {"reason": "r", "version": "1e9"}).status_code == 400
    assert client.post(form, {"reason": "r", "version": "5"}).status_code == 409
    assert client.post(form, {"reason": "r", "version": "1"}).status_code == 302
    assert selectors.stable_of(second.endpoint).model_version.version == 1

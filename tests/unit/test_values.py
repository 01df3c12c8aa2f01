"""Bad values are refused where they enter (issue 9, point 6 b-d): a drift rule on a feature the
model does not have, an approval policy that can never be met, a request to deploy the version
that is already live; and a champion gate never passes "for lack of a champion" when one is
live."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Group
from django.core.exceptions import ValidationError
from django.utils import timezone

from monitoring import alerts
from monitoring.models import AlertRule
from portal.audit import audit_verify
from portal.models import AuditEvent
from registry.models import ModelVersion, RegisteredModel
from rollouts import gates, services
from rollouts.models import Deployment, DeploymentRequest, Endpoint, Environment
from tests.factories import UserFactory

Status = DeploymentRequest.Status
NOW = timezone.now()
SIGNATURE = {
    "inputs": [{"type": "double", "name": "tenure"}, {"type": "string", "name": "plan"}],
    "outputs": [{"type": "long"}],
}


@pytest.fixture
def churn(team, data_scientist):
    """``churn`` v1 (signature tenure, plan) live on churn-staging; v2 (tenure only) not."""
    model = RegisteredModel.objects.create(name="churn", team=team, synced_at=NOW)
    v1 = ModelVersion.objects.create(
        registered_model=model, version=1, status="READY", synced_at=NOW, signature=SIGNATURE
    )
    ModelVersion.objects.create(
        registered_model=model,
        version=2,
        status="READY",
        synced_at=NOW,
        signature={"inputs": [{"type": "double", "name": "tenure"}, {"name": "age"}]},
    )
    endpoint = Endpoint.objects.create(
        name="churn-staging",
        environment=Environment.objects.get(name="staging"),
        registered_model=model,
    )
    req = DeploymentRequest.objects.create(
        model_version=v1,
        endpoint=endpoint,
        justification="test",
        requester=data_scientist,
        status=Status.LIVE,
    )
    Deployment.objects.create(
        endpoint=endpoint,
        model_version=v1,
        request=req,
        status=Deployment.Status.LIVE,
        traffic_weight=100,
        live_at=NOW,
    )
    return endpoint


# --- (b) a drift rule on a feature the model does not have ------------------------------------


def test_drift_rule_on_an_unknown_feature_is_refused_by_the_service(churn, platform_admin):
    with pytest.raises(ValidationError) as caught:
        alerts.alert_rule_create(
            actor=platform_admin, endpoint=churn, kind="drift", feature="tenur"
        )
    message = caught.value.message_dict["feature"][0]
    # Names the feature and what the live version's signature has instead.
    assert "'tenur'" in message and "plan, tenure" in message
    # ``age`` is an input of v2, which is not live: the rule watches what serves.
    with pytest.raises(ValidationError, match="age"):
        alerts.alert_rule_create(actor=platform_admin, endpoint=churn, kind="drift", feature="age")
    rule = alerts.alert_rule_create(
        actor=platform_admin, endpoint=churn, kind="drift", feature="plan"
    )
    with pytest.raises(ValidationError, match="not an input"):
        alerts.alert_rule_update(rule_id=rule.pk, actor=platform_admin, changes={"feature": "x"})
    assert AlertRule.objects.get().feature == "plan"
    assert not AuditEvent.objects.filter(action="alert_rule.updated").exists()


def test_drift_rule_feature_without_a_live_version_reads_every_signature(churn, platform_admin):
    Deployment.objects.update(status=Deployment.Status.RETIRED)
    rule = alerts.alert_rule_create(
        actor=platform_admin, endpoint=churn, kind="drift", feature="age"
    )
    assert rule.feature == "age"
    ModelVersion.objects.update(signature=None)
    with pytest.raises(ValidationError, match="no signature that names its input columns"):
        alerts.alert_rule_create(actor=platform_admin, endpoint=churn, kind="drift", feature="age")
    # The dataset's drift needs no feature, so it stays possible.
    assert alerts.alert_rule_create(actor=platform_admin, endpoint=churn, kind="drift").pk


def _rule_form(endpoint, **overrides):
    data = {
        "endpoint": endpoint.pk,
        "name": "",
        "kind": "drift",
        "threshold": "0.2",
        "feature": "tenur",
        "granularity": "hour",
        "percentile": "95",
        "window_hours": "6",
        "min_samples": "100",
        "label_delay_hours": "24",
        "action": "notify",
        "enabled": "on",
    }
    return {**data, **overrides}


@pytest.mark.parametrize(
    "url", ["/monitoring/alerts/rules/new", "/admin/monitoring/alertrule/add/"]
)
def test_drift_rule_on_an_unknown_feature_is_a_form_error(client, churn, platform_admin, url):
    client.force_login(platform_admin)
    response = client.post(url, _rule_form(churn))
    assert response.status_code in (200, 400)
    assert "is not an input of churn-staging" in response.content.decode()
    assert not AlertRule.objects.exists()
    assert client.post(url, _rule_form(churn, feature="tenure")).status_code == 302
    assert AlertRule.objects.get().feature == "tenure"


# --- (c) an approval policy that can never be met ---------------------------------------------


def test_a_policy_needing_more_approvals_than_approvers_is_refused(
    db, platform_admin, reviewer, second_reviewer
):
    staging = Environment.objects.get(name="staging")
    with pytest.raises(ValidationError) as caught:
        services.environment_policy_update(
            environment_id=staging.pk, actor=platform_admin, changes={"required_approvals": 3}
        )
    assert "only 2 active members" in caught.value.message_dict["required_approvals"][0]
    empty = Group.objects.create(name="release board")
    with pytest.raises(ValidationError) as caught:
        services.environment_policy_update(
            environment_id=staging.pk, actor=platform_admin, changes={"approver_group": empty}
        )
    assert "has no active members" in caught.value.message_dict["approver_group"][0]
    # An inactive member approves nothing.
    UserFactory(username="ghost", roles=["reviewers"], is_active=False)
    with pytest.raises(ValidationError):
        services.environment_policy_update(
            environment_id=staging.pk, actor=platform_admin, changes={"required_approvals": 3}
        )
    staging.refresh_from_db()
    assert (staging.required_approvals, staging.approver_group) == (1, None)
    assert not AuditEvent.objects.filter(action="environment.policy_changed").exists()
    services.environment_policy_update(
        environment_id=staging.pk, actor=platform_admin, changes={"required_approvals": 2}
    )
    assert Environment.objects.get(name="staging").required_approvals == 2


def test_the_api_refuses_an_unmeetable_policy_and_reports_a_shrunk_one(
    client, platform_admin, reviewer, second_reviewer
):
    client.force_login(platform_admin)
    url = "/api/environments/production"  # two approvals from the reviewers
    response = client.patch(url, {"required_approvals": 3}, content_type="application/json")
    assert response.status_code == 400 and "required_approvals" in response.json()
    assert client.get(url).json()["policy_problem"] == ""
    second_reviewer.groups.clear()
    problem = client.get(url).json()["policy_problem"]
    assert "needs 2 distinct approvals" in problem and "only 1 active member" in problem


def test_the_admin_saves_nothing_of_an_environment_whose_policy_fails(
    client, platform_admin, reviewer
):
    client.force_login(platform_admin)
    staging = Environment.objects.get(name="staging")
    original = (staging.description, staging.order)
    url = f"/admin/rollouts/environment/{staging.pk}/change/"
    form = {
        "description": "changed",
        "order": "7",
        "required_approvals": "4",
        "approver_group": "",
        "requires_live_in": "",
        "gates": '["model_loads"]',
        "metric_tolerance": "0.0",
        "request_expiry_days": "7",
        "allowed_strategies": '["direct"]',
        "rollout_defaults": "{}",
        "analysis_policy": "{}",
    }
    response = client.post(url, form)
    assert response.status_code == 200  # the form again, with the error
    assert "so no request could ever be approved" in response.content.decode()
    staging.refresh_from_db()
    assert (staging.description, staging.order, staging.required_approvals) == (*original, 1)
    assert not AuditEvent.objects.filter(environment="staging").exists()
    # A new environment is validated whole before it is saved, too.
    add = client.post("/admin/rollouts/environment/add/", {**form, "name": "qa"})
    assert add.status_code == 200 and not Environment.objects.filter(name="qa").exists()
    assert client.post(url, {**form, "required_approvals": "1"}).status_code == 302
    staging.refresh_from_db()
    assert (staging.description, staging.order) == ("changed", 7)
    event = AuditEvent.objects.get(action="environment.policy_changed")
    assert event.after["description"] == "changed" and event.after["gates"] == ["model_loads"]
    assert audit_verify().intact


def test_the_request_page_warns_when_the_approver_group_shrank(
    client, churn, data_scientist, reviewer, second_reviewer
):
    production = Environment.objects.get(name="production")
    endpoint = Endpoint.objects.create(
        name="churn-production", environment=production, registered_model=churn.registered_model
    )
    req = DeploymentRequest.objects.create(
        model_version=ModelVersion.objects.get(version=2),
        endpoint=endpoint,
        justification="test",
        requester=data_scientist,
        status=Status.AWAITING_REVIEW,
    )
    client.force_login(reviewer)
    page = client.get(req.get_absolute_url())
    assert page.status_code == 200 and 'data-testid="policy-problem"' not in page.content.decode()
    # The requester is a reviewer too: they never count among their own approvers.
    data_scientist.groups.add(Group.objects.get(name="reviewers"))
    second_reviewer.groups.clear()
    page = client.get(req.get_absolute_url()).content.decode()
    assert 'data-testid="policy-problem"' in page
    assert "only 1 person other than the requester can approve" in page
    api = client.get(f"/api/requests/{req.pk}").json()
    assert "cannot be approved" in api["policy_problem"]


# --- (d) a request for the version already live -----------------------------------------------


def test_requesting_the_live_version_is_refused(client, churn, data_scientist):
    staging = Environment.objects.get(name="staging")
    v1 = ModelVersion.objects.get(version=1)
    with pytest.raises(services.AlreadyLive, match="already live on churn-staging"):
        services.deployment_request_create(
            requester=data_scientist, model_version=v1, environment=staging, justification="again"
        )
    client.force_login(data_scientist)
    body = {"model": "churn", "version": 1, "environment": "staging", "justification": "again"}
    response = client.post("/api/requests", body, content_type="application/json")
    assert response.status_code == 409 and "already live" in response.json()["detail"]
    page = client.post(
        "/rollouts/requests/new/churn/1/",
        {"environment": staging.pk, "strategy": "direct", "justification": "again"},
    )
    assert page.status_code == 409 and "already live on churn-staging" in page.content.decode()
    assert DeploymentRequest.objects.count() == 1


def test_champion_gates_fail_when_the_candidate_is_the_champion(churn):
    v1 = ModelVersion.objects.get(version=1)
    for check in (
        lambda: gates._signature_compatible(v1, v1),
        lambda: gates._metrics_within_tolerance(v1, v1, 0.0),
    ):
        outcome = check()
        assert not outcome.passed and "is the live champion itself" in outcome.summary
    v2 = ModelVersion.objects.get(version=2)
    assert gates._signature_compatible(v2, None).passed  # nothing live: nothing to compare


def test_gates_of_a_request_whose_version_went_live_meanwhile_fail(
    churn, data_scientist, monkeypatch
):
    """A request opened for v2 while v1 served; v2 then went live by another road (here set
    directly, as a rollback would). Its gates compare with the live champion, v2 itself, and
    fail instead of passing with "no live champion to compare with"."""
    staging = Environment.objects.get(name="staging")
    v2 = ModelVersion.objects.get(version=2)
    req = services.deployment_request_create(
        requester=data_scientist, model_version=v2, environment=staging, justification="new"
    )
    Deployment.objects.filter(model_version__version=1).update(status=Deployment.Status.RETIRED)
    other = DeploymentRequest.objects.create(
        model_version=v2, endpoint=churn, justification="x", requester=data_scientist, status="live"
    )
    Deployment.objects.create(
        endpoint=churn, model_version=v2, request=other, status="live", traffic_weight=100
    )
    seen = {}

    def fake_run(candidate, champion, **kwargs):
        seen["champion"] = champion
        outcomes = [
            gates._signature_compatible(candidate, champion),
            gates._metrics_within_tolerance(candidate, champion, 0.0),
        ]
        return gates.GateRun("d" * 64, outcomes)

    monkeypatch.setattr(gates, "run_gates", fake_run)
    req = services.deployment_request_run_gates(request_id=req.pk)
    assert seen["champion"] == v2
    assert req.status == Status.GATES_FAILED
    assert all(not g.passed for g in req.gate_results.all())

"""Writes of the rollouts app. Every state change of a deployment request, a deployment or an
endpoint's traffic goes through one function here; HTML views, the API, Celery tasks and the
admin all call these.

Transitions lock the request row (``select_for_update``) and check the transition table, so two
concurrent decisions give one winner; the loser gets :class:`InvalidTransition` (HTTP 409).
Slow work (MLflow, model loading) runs outside transactions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import models, transaction
from django.utils import timezone
from django.utils.text import slugify

from portal.audit import audit_record
from portal.errors import Conflict
from portal.roles import REVIEWERS, can_request_deployment, can_review, is_platform_admin
from portal.tasking import enqueue, enqueue_on_commit
from registry import mlflow_client
from registry.models import ModelVersion
from registry.services import registry_set_alias
from rollouts import gates, strategies
from rollouts.models import (
    ApiKey,
    Comment,
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    FreezeWindow,
    GateResult,
    Review,
    Rollout,
    RolloutStep,
    Strategy,
    TrafficHistory,
)
from rollouts.selectors import stable_of

logger = logging.getLogger(__name__)
Status = DeploymentRequest.Status


class InvalidTransition(Conflict):
    """The request is not in a state that allows this action (HTTP 409)."""


class SeparationOfDutiesError(PermissionDenied):
    """The requester of a deployment tried to review it (HTTP 403)."""


class AlreadyLive(Conflict):
    """The version is already live on the endpoint: there is nothing to deploy (HTTP 409)."""


class ArtifactChanged(Conflict):
    """The version's artifacts no longer match the digest its gates checked (HTTP 409)."""


def _transition(req: DeploymentRequest, new: str, *, reason: str = "") -> str:
    """Move a locked request to ``new`` per ``DeploymentRequest.TRANSITIONS``; returns the old
    status. Raises InvalidTransition."""
    old = req.status
    if new not in DeploymentRequest.TRANSITIONS[old]:
        raise InvalidTransition(
            f"Request #{req.pk} is {req.get_status_display().lower()}; it cannot become "
            f"{Status(new).label.lower()}."
        )
    req.status = new
    req.status_reason = reason
    fields = ["status", "status_reason", "updated_at"]
    if new in (Status.APPROVED, Status.REJECTED):
        req.decided_at = timezone.now()
        fields.append("decided_at")
    if new == Status.LIVE:
        req.live_at = timezone.now()
        fields.append("live_at")
    req.save(update_fields=fields)
    return old


def _locked_request(request_id: int) -> DeploymentRequest:
    return (
        DeploymentRequest.objects.select_for_update(of=("self",))
        .select_related("model_version__registered_model", "endpoint__environment", "requester")
        .get(pk=request_id)
    )


def _audit(
    req: DeploymentRequest,
    action: str,
    actor: User | None,
    before: dict | None = None,
    after: dict | None = None,
) -> None:
    audit_record(
        actor=actor,
        action=action,
        obj=req,
        registered_model=req.model_version.registered_model.name,
        environment=req.endpoint.environment.name,
        before=before,
        after=after,
    )


def _notify(request_id: int, event: str) -> None:
    """Owe the e-mail for ``event``: an outbox row in this transaction, sent after commit
    (and by beat when the broker was down; see :mod:`rollouts.notifications`)."""
    from rollouts.notifications import notification_record

    notification_record(request_id=request_id, event=event)


def endpoint_for(*, model_version: ModelVersion, environment: Environment) -> Endpoint:
    """The endpoint of the version's registered model in ``environment``, created on first use
    and named ``<model>-<environment>`` (``-2``, ``-3``... appended when another model's name
    slugifies to the same, e.g. "churn model" and "churn-model")."""
    model = model_version.registered_model
    endpoint = Endpoint.objects.filter(registered_model=model, environment=environment).first()
    if endpoint is not None:
        return endpoint
    # Registered model names are free text (up to 255 characters, any script); endpoint names
    # are unique slugs of at most 100, so they are truncated and de-duplicated.
    base = slugify(f"{model.name[:80]}-{environment.name}")[:90].strip("-") or "endpoint"
    name, n = base, 1
    while Endpoint.objects.filter(name=name).exists():
        n += 1
        name = f"{base}-{n}"
    endpoint, _ = Endpoint.objects.get_or_create(
        registered_model=model, environment=environment, defaults={"name": name}
    )
    return endpoint


def champion_of(endpoint: Endpoint) -> ModelVersion | None:
    """The endpoint's stable version (``selectors.stable_of``), None when nothing is live."""
    stable = stable_of(endpoint)
    return stable.model_version if stable else None


def _check_not_live(model_version: ModelVersion, endpoint: Endpoint) -> None:
    """Raises AlreadyLive when ``model_version`` serves on ``endpoint``: a request for it would
    deploy nothing, and its champion gates would compare it with itself."""
    if Deployment.objects.filter(
        endpoint=endpoint, model_version=model_version, status=Deployment.Status.LIVE
    ).exists():
        raise AlreadyLive(
            f"{model_version} is already live on {endpoint.name}; there is nothing to deploy."
        )


@transaction.atomic
def deployment_request_create(
    *,
    requester: User,
    model_version: ModelVersion,
    environment: Environment,
    strategy: str = Strategy.DIRECT,
    strategy_params: dict | None = None,
    justification: str,
    previous_request: DeploymentRequest | None = None,
) -> DeploymentRequest:
    """Open a request to deploy ``model_version`` to its endpoint in ``environment``; its gates
    run in a Celery task once the transaction commits. ``strategy_params`` are the strategy's
    parameters (``rollouts.strategies``); missing ones come from the environment's
    ``rollout_defaults``, then the strategy's own.

    Raises:
        PermissionDenied: the user is not a data scientist of the model's team.
        ValidationError: unknown strategy, one the environment does not allow, a bad strategy
            parameter (named), a canary with no live stable to compare with, empty justification, a version deleted in MLflow or
            not marked READY, the promotion path not followed (e.g. production before staging), or an open
            request for the same version and endpoint.
        AlreadyLive: the version is already live on that endpoint (409).
    """
    from rollouts import tasks

    if not can_request_deployment(requester):
        raise PermissionDenied("Only data scientists can request deployments.")
    model = model_version.registered_model
    if model.team_id is None or not model.team.members.filter(pk=requester.pk).exists():
        raise PermissionDenied(f"{model.name} does not belong to one of your teams.")
    if strategy not in Strategy.values:
        raise ValidationError({"strategy": f"Unknown strategy {strategy!r}."})
    if strategy not in environment.allowed_strategies:
        raise ValidationError(
            {
                "strategy": f"{environment.name} does not allow the {strategy} strategy; it "
                f"allows {', '.join(environment.allowed_strategies) or 'none'}."
            }
        )
    planned = strategies.plan(
        strategy, strategy_params or {}, (environment.rollout_defaults or {}).get(strategy, {})
    )
    if not justification.strip():
        raise ValidationError({"justification": "Say why this version should be deployed."})
    if model_version.deleted_at is not None:
        raise ValidationError(
            {
                "model_version": f"{model_version} was deleted in MLflow "
                f"({model_version.deleted_at:%Y-%m-%d %H:%M} UTC); it cannot be deployed."
            }
        )
    if model_version.status != "READY":
        raise ValidationError(
            {
                "model_version": f"{model_version} is {model_version.status or 'not ready'} in MLflow."
            }
        )
    prior = environment.requires_live_in
    if (
        prior is not None
        and not Deployment.objects.filter(
            model_version=model_version, endpoint__environment=prior, live_at__isnull=False
        ).exists()
    ):
        raise ValidationError(
            {
                "environment": f"{environment.name} requires v{model_version.version} to have been live in {prior.name} first."
            }
        )
    endpoint = endpoint_for(model_version=model_version, environment=environment)
    # Lock the endpoint row so that concurrent creates for it queue here: on PostgreSQL a
    # select_for_update() that matches no open request locks nothing, so without this two
    # requests could both pass the duplicate check below.
    Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    _check_not_live(model_version, endpoint)
    if strategy == Strategy.CANARY and stable_of(endpoint) is None:
        raise ValidationError(
            {
                "strategy": f"A canary is compared with the live stable version, and "
                f"{endpoint.name} has none yet: deploy the first release directly."
            }
        )
    open_request = DeploymentRequest.objects.filter(
        model_version=model_version, endpoint=endpoint, status__in=DeploymentRequest.ACTIVE
    ).first()
    if open_request is not None:
        raise ValidationError(
            {"model_version": f"Request #{open_request.pk} for this version is already open."}
        )
    req = DeploymentRequest.objects.create(
        model_version=model_version,
        endpoint=endpoint,
        strategy=strategy,
        strategy_params=planned.as_dict()["params"],
        justification=justification.strip(),
        requester=requester,
        previous_request=previous_request,
        expires_at=timezone.now() + timedelta(days=environment.request_expiry_days),
    )
    _audit(
        req,
        "request.created",
        requester,
        after={
            "status": req.status,
            "version": model_version.version,
            "endpoint": endpoint.name,
            "strategy": strategy,
            "strategy_params": planned.as_dict()["params"],
            "previous_request": previous_request.pk if previous_request else None,
        },
    )
    enqueue_on_commit(tasks.run_gates, req.pk)
    return req


def deployment_request_resubmit(
    *, request_id: int, requester: User, justification: str
) -> DeploymentRequest:
    """Ask again after a rejection (or failed gates, expiry, cancellation, failure): a new
    request for the same version and environment, linked to the old one.

    Raises: PermissionDenied (not the original requester), InvalidTransition (the old request
    is still open or went live), and what :func:`deployment_request_create` raises.
    """
    old = DeploymentRequest.objects.select_related(
        "model_version__registered_model__team", "endpoint__environment"
    ).get(pk=request_id)
    if old.requester_id != requester.pk:
        raise PermissionDenied("Only the original requester can ask again.")
    if old.status not in DeploymentRequest.RESUBMITTABLE:
        raise InvalidTransition(
            f"Request #{old.pk} is {old.get_status_display().lower()}; there is nothing to ask again."
        )
    return deployment_request_create(
        requester=requester,
        model_version=old.model_version,
        environment=old.endpoint.environment,
        strategy=old.strategy,
        justification=justification,
        previous_request=old,
    )


# --- Gates ------------------------------------------------------------------------------------


def deployment_request_run_gates(*, request_id: int) -> DeploymentRequest:
    """Run the environment's gates on a pending request and record the evidence, bound to the
    artifact digest; the request then awaits review or has failed its gates.

    Idempotent: a request that is no longer pending is returned unchanged.
    """
    req = DeploymentRequest.objects.select_related(
        "model_version__registered_model", "endpoint__environment"
    ).get(pk=request_id)
    if req.status != Status.PENDING_GATES:
        return req
    env = req.endpoint.environment
    # The champion is whatever is live, even the candidate itself (it went live by another
    # road after this request was opened, e.g. a rollback): the gates then fail, never pass
    # "for lack of a champion".
    champion = champion_of(req.endpoint)
    try:
        run = gates.run_gates(
            req.model_version, champion, gates=env.gates, metric_tolerance=env.metric_tolerance
        )
        outcomes, digest = run.outcomes, run.artifact_digest
    except mlflow_client.RegistryError as exc:
        outcomes = [gates.GateOutcome("artifacts_readable", False, str(exc)[:500])]
        digest = ""
    return _record_gates(request_id, outcomes, digest)


@transaction.atomic
def _record_gates(
    request_id: int, outcomes: list[gates.GateOutcome], digest: str
) -> DeploymentRequest:
    req = _locked_request(request_id)
    if req.status != Status.PENDING_GATES:
        return req
    GateResult.objects.filter(request=req).delete()
    GateResult.objects.bulk_create(
        GateResult(
            request=req,
            name=o.name,
            passed=o.passed,
            summary=o.summary[:1000],
            details=o.details,
            artifact_digest=digest,
            seconds=o.seconds,
        )
        for o in outcomes
    )
    failed = [o.name for o in outcomes if not o.passed]
    req.artifact_digest = digest
    req.save(update_fields=["artifact_digest"])
    if failed:
        old = _transition(req, Status.GATES_FAILED, reason=f"failed gates: {', '.join(failed)}")
        action, event = "request.gates_failed", "gates_failed"
    else:
        old = _transition(req, Status.AWAITING_REVIEW)
        action, event = "request.gates_passed", "awaiting_review"
    _audit(
        req,
        action,
        None,
        before={"status": old},
        after={
            "status": req.status,
            "artifact_digest": digest,
            "gates": {o.name: o.passed for o in outcomes},
        },
    )
    _notify(req.pk, event)
    return req


# --- Reviews ----------------------------------------------------------------------------------


def approver_group_name(environment: Environment) -> str:
    return environment.approver_group.name if environment.approver_group_id else REVIEWERS


def _check_reviewer(req: DeploymentRequest, reviewer: User) -> None:
    """Separation of duties first (whatever the reviewer's groups or staff status), then the
    environment's approver group."""
    if req.requester_id == reviewer.pk:
        raise SeparationOfDutiesError("You requested this deployment, so you cannot review it.")
    group = approver_group_name(req.endpoint.environment)
    if not reviewer.is_authenticated or not reviewer.groups.filter(name=group).exists():
        raise PermissionDenied(
            f"Only members of {group!r} can review {req.endpoint.environment.name} releases."
        )


def _check_not_reviewed(req: DeploymentRequest, reviewer: User) -> None:
    if req.reviews.filter(reviewer=reviewer).exists():
        raise Conflict(f"You have already reviewed request #{req.pk}; one person counts once.")


def deployment_request_approve(
    *, request_id: int, reviewer: User, comment: str = ""
) -> DeploymentRequest:
    """Record an approval; the N-th distinct approval (N from the environment's policy) approves
    the request and, once the transaction commits, launches its deployment.

    The artifact digest is recomputed first (outside the transaction): an approval of artifacts
    that changed after the gates ran is refused.

    Raises:
        DeploymentRequest.DoesNotExist: no such request.
        SeparationOfDutiesError / PermissionDenied: the reviewer may not review it (403).
        InvalidTransition: the request is not awaiting review (409).
        Conflict: already reviewed by this person, artifacts changed, or a freeze window (409).
        mlflow_client.RegistryError: the artifacts cannot be read to check the digest.
    """
    req = DeploymentRequest.objects.select_related(
        "model_version__registered_model", "endpoint__environment"
    ).get(pk=request_id)
    _check_reviewer(req, reviewer)  # refuse early, before reading artifacts
    current_digest = mlflow_client.artifact_digest(
        req.model_version.registered_model.name, req.model_version.version
    )
    return _approve(request_id, reviewer, comment, current_digest)


@transaction.atomic
def _approve(
    request_id: int, reviewer: User, comment: str, current_digest: str
) -> DeploymentRequest:
    from rollouts import tasks

    req = _locked_request(request_id)
    _check_reviewer(req, reviewer)
    if req.status != Status.AWAITING_REVIEW:
        raise InvalidTransition(
            f"Request #{req.pk} is {req.get_status_display().lower()}; only a request awaiting "
            "review can be approved."
        )
    _check_not_reviewed(req, reviewer)
    _check_not_live(req.model_version, req.endpoint)  # went live by a rollback meanwhile
    if current_digest != req.artifact_digest:
        raise ArtifactChanged(
            f"The artifacts of {req.model_version} changed after its gates ran "
            f"(sha256 {req.artifact_digest[:12]}… then, {current_digest[:12]}… now); ask again to re-run the gates."
        )
    env = req.endpoint.environment
    approvals = req.reviews.filter(decision=Review.Decision.APPROVE).count() + 1
    final = approvals >= env.required_approvals
    if final:
        freeze = env.active_freeze(timezone.now())
        if freeze is not None and not req.freeze_override_reason:
            raise Conflict(
                f"{env.name} is frozen until {freeze.ends_at:%Y-%m-%d %H:%M} UTC ({freeze.reason}); "
                "a platform admin can override the freeze for this request."
            )
    Review.objects.create(
        request=req, reviewer=reviewer, decision=Review.Decision.APPROVE, comment=comment
    )
    if not final:
        _audit(
            req,
            "request.approval_recorded",
            reviewer,
            after={"approvals": approvals, "required": env.required_approvals, "comment": comment},
        )
        return req
    old = _transition(req, Status.APPROVED)
    _audit(
        req,
        "request.approved",
        reviewer,
        before={"status": old},
        after={"status": req.status, "approvals": approvals, "comment": comment},
    )
    rollout_plan(req)
    _notify(req.pk, "approved")
    enqueue_on_commit(tasks.execute_deployment, req.pk)
    return req


@transaction.atomic
def deployment_request_reject(
    *, request_id: int, reviewer: User, comment: str
) -> DeploymentRequest:
    """Reject a request; a comment is required so the requester learns why. One rejection from
    an eligible reviewer is enough.

    Raises: as :func:`deployment_request_approve` (but reads no artifacts), and ValidationError
    without a comment.
    """
    if not comment.strip():
        raise ValidationError({"comment": "Say why the request is rejected."})
    req = _locked_request(request_id)
    _check_reviewer(req, reviewer)
    if req.status == Status.AWAITING_REVIEW:
        _check_not_reviewed(req, reviewer)
    old = _transition(req, Status.REJECTED, reason=comment.strip())
    Review.objects.create(
        request=req, reviewer=reviewer, decision=Review.Decision.REJECT, comment=comment
    )
    _audit(
        req,
        "request.rejected",
        reviewer,
        before={"status": old},
        after={"status": req.status, "comment": comment},
    )
    _notify(req.pk, "rejected")
    return req


@transaction.atomic
def deployment_request_cancel(*, request_id: int, actor: User) -> DeploymentRequest:
    """The requester (or a platform admin) withdraws a request before it goes live, also one
    stuck in ``deploying`` (its worker died): its deployment, never live, is marked failed, and a
    deploy task still running finds the request cancelled and promotes nothing
    (``_deployment_promote`` re-checks the status under the row lock).

    Raises: PermissionDenied (not the requester, or a platform admin of a request that is not
    deploying), InvalidTransition
    (already live or done).
    """
    req = _locked_request(request_id)
    stuck = req.status == Status.DEPLOYING
    if req.requester_id != actor.pk and not (stuck and is_platform_admin(actor)):
        raise PermissionDenied(
            "Only the requester can cancel a request (a platform admin too while it is deploying)."
        )
    reason = f"cancelled by {actor.get_username()}"
    old = _transition(req, Status.CANCELLED, reason=reason)
    if old == Status.DEPLOYING:
        # Never live, so it has no traffic to take away (traffic_set gives weight to live rows).
        Deployment.objects.filter(request=req).exclude(status=Deployment.Status.LIVE).update(
            status=Deployment.Status.FAILED, failure_reason=reason
        )
        req.deploy_lease_until = None
        req.save(update_fields=["deploy_lease_until", "updated_at"])
    if old in (Status.APPROVED, Status.DEPLOYING):
        _rollout_end(req, Rollout.State.ABORTED, reason=reason)
    _audit(req, "request.cancelled", actor, before={"status": old}, after={"status": req.status})
    return req


@transaction.atomic
def deployment_request_comment(*, request_id: int, author: User, body: str) -> Comment:
    """Add a comment to a request's discussion. Raises ValidationError for an empty body."""
    if not body.strip():
        raise ValidationError({"body": "Write something."})
    req = _locked_request(request_id)
    comment = Comment.objects.create(request=req, author=author, body=body.strip()[:4000])
    _audit(req, "request.commented", author, after={"comment": comment.body})
    return comment


@transaction.atomic
def deployment_request_override_freeze(
    *, request_id: int, actor: User, reason: str
) -> DeploymentRequest:
    """A platform admin lets this request be released during a freeze window, with a reason.

    Raises: PermissionDenied (not a platform admin), ValidationError (no reason),
    InvalidTransition (the request is already decided).
    """
    if not is_platform_admin(actor):
        raise PermissionDenied("Only platform admins can override a freeze window.")
    if not reason.strip():
        raise ValidationError({"reason": "Say why this release cannot wait for the freeze to end."})
    req = _locked_request(request_id)
    if req.status not in DeploymentRequest.UNDECIDED:
        raise InvalidTransition(
            f"Request #{req.pk} is {req.get_status_display().lower()}; a freeze override no longer applies."
        )
    req.freeze_override_reason, req.freeze_override_by = reason.strip(), actor
    req.save(update_fields=["freeze_override_reason", "freeze_override_by", "updated_at"])
    _audit(req, "request.freeze_overridden", actor, after={"reason": req.freeze_override_reason})
    return req


def deployment_requests_expire(*, now: datetime | None = None) -> list[int]:
    """Expire every undecided request whose ``expires_at`` has passed; returns their ids."""
    now = now or timezone.now()
    expired = []
    due = DeploymentRequest.objects.filter(
        status__in=DeploymentRequest.UNDECIDED, expires_at__lte=now
    )
    for request_id in due.values_list("pk", flat=True):
        with transaction.atomic():
            req = _locked_request(request_id)
            if req.status not in DeploymentRequest.UNDECIDED:
                continue  # decided meanwhile
            old = _transition(
                req, Status.EXPIRED, reason=f"not decided by {req.expires_at:%Y-%m-%d %H:%M} UTC"
            )
            _audit(
                req, "request.expired", None, before={"status": old}, after={"status": req.status}
            )
            _notify(req.pk, "expired")
            expired.append(request_id)
    return expired


def environment_policy_validate(env: Environment, *, changed: set[str] | None = None) -> None:
    """Check an environment (saved or not) with its policy as a whole, before anything of it is
    saved: known gates, a promotion path that does not loop, field ranges, and an approval
    policy that can be met (``selectors.approval_policy_problem``).

    The last is checked when ``required_approvals`` or ``approver_group`` is in ``changed``
    (None: a new environment, every field), so that a later unrelated edit is not refused
    because membership shrank meanwhile; that case is warned about on the pages instead.

    Raises: ValidationError keyed by field.
    """
    from rollouts.selectors import approval_policy_problem

    bad_gates = (
        sorted(set(env.gates) - set(gates.ALL_GATES))
        if isinstance(env.gates, list)
        else ["(not a list)"]
    )
    if bad_gates:
        raise ValidationError(
            {
                "gates": f"Unknown gate(s): {', '.join(map(str, bad_gates))}; known: {', '.join(gates.ALL_GATES)}."
            }
        )
    _rollout_policy_validate(env)
    seen, step = {env.pk}, env.requires_live_in
    while step is not None:
        if step.pk in seen:
            raise ValidationError({"requires_live_in": "The promotion path would loop."})
        seen.add(step.pk)
        step = step.requires_live_in
    env.full_clean(validate_unique=env.pk is None)
    if changed is None or {"required_approvals", "approver_group"} & changed:
        problem = approval_policy_problem(env)
        if problem:
            field = "approver_group" if "no active members" in problem else "required_approvals"
            raise ValidationError({field: problem})


def _rollout_policy_validate(env: Environment) -> None:
    """Allowed strategies, their default parameters and the analysis thresholds, each checked
    by the code that will use them. Raises ValidationError keyed by field."""
    from rollouts.analysis import AnalysisPolicy

    allowed = env.allowed_strategies
    if (
        not isinstance(allowed, list)
        or not allowed
        or any(name not in Strategy.values for name in allowed)
    ):
        raise ValidationError(
            {
                "allowed_strategies": "A non-empty list of strategies, of: "
                + ", ".join(Strategy.values)
                + "."
            }
        )
    defaults = env.rollout_defaults
    if not isinstance(defaults, dict) or set(defaults) - set(Strategy.values):
        raise ValidationError(
            {"rollout_defaults": "An object of default parameters per strategy name."}
        )
    for name, params in defaults.items():
        try:
            strategies.plan(name, {}, params)
        except ValidationError as exc:
            problems = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            raise ValidationError({"rollout_defaults": f"{name}: {problems}"}) from exc
    thresholds = env.analysis_policy
    try:
        if not isinstance(thresholds, dict):
            raise TypeError("an object of thresholds")
        AnalysisPolicy(**thresholds)
    except (TypeError, ValueError) as exc:
        raise ValidationError(
            {"analysis_policy": f"Not valid canary analysis thresholds: {exc}"}
        ) from exc


@transaction.atomic
def environment_create(*, actor: User, fields: dict[str, object]) -> Environment:
    """Create an environment (``name``, ``description``, ``order`` and policy fields), fully
    validated before it is saved, with one audit event.

    Raises: PermissionDenied (not a platform admin), ValidationError (as
    :func:`environment_policy_validate`, or a taken name).
    """
    if not is_platform_admin(actor):
        raise PermissionDenied("Only platform admins can create environments.")
    allowed = {"name", "description", "order", *Environment.POLICY_FIELDS}
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise ValidationError({field: "Not an environment field." for field in unknown})
    env = Environment(**fields)
    environment_policy_validate(env)
    env.save()
    audit_record(
        actor=actor,
        action="environment.created",
        obj=env,
        environment=env.name,
        after={"description": env.description, "order": env.order, **env.policy()},
    )
    return env


@transaction.atomic
def environment_policy_update(
    *, environment_id: int, actor: User, changes: dict[str, object]
) -> Environment:
    """Change an environment's approval policy (fields of ``Environment.POLICY_FIELDS``) and
    its ``description`` and ``order``, all or nothing, with one audit event holding the values
    before and after. Nothing is saved unless the whole result validates.

    Raises: PermissionDenied (not a platform admin), ValidationError (unknown field, unknown
    gate, value out of range, a promotion path that loops, an approval policy that cannot be
    met: more required approvals than active members of the approver group, or none).
    """
    if not is_platform_admin(actor):
        raise PermissionDenied("Only platform admins can change approval policies.")
    env = Environment.objects.select_for_update().get(pk=environment_id)
    editable = {*Environment.POLICY_FIELDS, "description", "order"}
    unknown = sorted(set(changes) - editable)
    if unknown:
        raise ValidationError({field: "Not a policy field." for field in unknown})

    def snapshot() -> dict[str, object]:
        return {"description": env.description, "order": env.order, **env.policy()}

    before = snapshot()
    for field, value in changes.items():
        setattr(env, field, value)
    environment_policy_validate(env, changed=set(changes))
    after = snapshot()
    changed = [k for k in after if after[k] != before[k]]
    env.save()
    # Policy fields are always recorded whole (readers compare policies); the rest only when
    # they changed.
    extra = [k for k in ("description", "order") if k in changed]
    audit_record(
        actor=actor,
        action="environment.policy_changed",
        obj=env,
        environment=env.name,
        before={**_policy_part(before), **{k: before[k] for k in extra}},
        after={**env.policy(), **{k: after[k] for k in extra}},
    )
    return env


def _policy_part(snapshot: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in snapshot.items() if k in Environment.POLICY_FIELDS}


@transaction.atomic
def freeze_window_create(
    *, environment: Environment, actor: User, starts_at: datetime, ends_at: datetime, reason: str
) -> FreezeWindow:
    """Raises PermissionDenied (not a platform admin), ValidationError (empty reason, ends first)."""
    if not is_platform_admin(actor):
        raise PermissionDenied("Only platform admins can schedule freeze windows.")
    if not reason.strip():
        raise ValidationError({"reason": "Say why releases are frozen."})
    if ends_at <= starts_at:
        raise ValidationError({"ends_at": "The freeze must end after it starts."})
    window = FreezeWindow.objects.create(
        environment=environment, starts_at=starts_at, ends_at=ends_at, reason=reason.strip()
    )
    audit_record(
        actor=actor,
        action="environment.freeze_scheduled",
        obj=window,
        environment=environment.name,
        after={
            "starts_at": starts_at.isoformat(),
            "ends_at": ends_at.isoformat(),
            "reason": window.reason,
        },
    )
    return window


# --- Deployment execution (called by the Celery task) ----------------------------------------


# --- Rollouts ----------------------------------------------------------------------------------


def rollout_plan(req: DeploymentRequest) -> Rollout:
    """The request's rollout (state pending) with one step per planned step of its strategy
    (``rollouts.strategies``: direct, one step of 100 %); the existing one if it has one
    already. Call it in the transaction that holds the request's row lock."""
    rollout, created = Rollout.objects.get_or_create(
        request=req, defaults={"strategy": req.strategy}
    )
    if created:
        planned = strategies.plan(req.strategy, req.strategy_params or {})
        RolloutStep.objects.bulk_create(
            RolloutStep(rollout=rollout, index=step.index, planned_weight=step.weight)
            for step in planned.steps
        )
    return rollout


def _rollout_transition(rollout: Rollout, new: str, *, reason: str = "") -> None:
    """Move a locked rollout to ``new`` per ``Rollout.TRANSITIONS``. Raises InvalidTransition."""
    if new not in Rollout.TRANSITIONS[rollout.state]:
        raise InvalidTransition(
            f"The rollout of request #{rollout.request_id} is "
            f"{rollout.get_state_display().lower()}; it cannot become "
            f"{Rollout.State(new).label.lower()}."
        )
    now = timezone.now()
    rollout.state, rollout.state_reason = new, reason
    fields = ["state", "state_reason", "updated_at"]
    if new == Rollout.State.PROGRESSING and rollout.started_at is None:
        rollout.started_at = now
        fields.append("started_at")
    if new in Rollout.TERMINAL:
        rollout.ended_at, rollout.lease_owner, rollout.lease_until = now, "", None
        fields += ["ended_at", "lease_owner", "lease_until"]
    rollout.save(update_fields=fields)


def _locked_rollout(req: DeploymentRequest) -> Rollout:
    """The request's rollout, locked; planned now for a request approved before rollouts
    existed."""
    rollout_plan(req)
    return Rollout.objects.select_for_update().get(request=req)


def _rollout_end(req: DeploymentRequest, state: str, *, reason: str = "") -> None:
    """End the request's active rollout (succeeded or aborted) and its step in progress."""
    rollout = _locked_rollout(req)
    if not rollout.is_active:
        return
    RolloutStep.objects.filter(
        rollout=rollout, started_at__isnull=False, ended_at__isnull=True
    ).update(ended_at=timezone.now())
    _rollout_transition(rollout, state, reason=reason)


def deploy_lease() -> timedelta:
    """How long a deploy task's claim on a request lasts: the task's hard time limit
    (``DEPLOY_TIME_LIMIT_S``, the worker kills the task after it) plus
    ``DEPLOY_LEASE_MARGIN_S``, in seconds; after that the claimant is presumed dead."""
    return timedelta(seconds=settings.DEPLOY_TIME_LIMIT_S + settings.DEPLOY_LEASE_MARGIN_S)


def deployment_execute(*, request_id: int) -> DeploymentRequest:
    """Deploy an approved request: load the version, smoke-test it on its input example, pin its
    artifact digest, make it the endpoint's live version and move the environment's alias.

    The task first claims the request (``deploy_attempts`` + 1, ``deploy_lease_until``); a
    second delivery while that claim is live does nothing. When the claimant died, its lease
    lapses and ``deployment_requests_redispatch`` (beat) queues the deploy again; after
    ``DEPLOY_MAX_ATTEMPTS`` lapsed claims the request is marked failed with the reason.

    Idempotent: run twice, or again after a worker died mid-way, it converges to the same end
    state. A failed smoke test marks the request failed and leaves the previous version live.

    Raises:
        mlflow_client.RegistryError: only when moving the alias failed (the task retries); the
            deployment itself is already live by then.
    """
    req, deployment, claimed = _deployment_begin(request_id)
    if claimed:
        try:
            digest = _smoke_test(req.model_version)
            if req.artifact_digest and digest != req.artifact_digest:
                raise RuntimeError(
                    f"the artifacts changed after approval (gates checked sha256 "
                    f"{req.artifact_digest[:12]}…, found {digest[:12]}…)"
                )
        except Exception as exc:  # any failure of a model we were asked to launch is its failure
            logger.warning("deployment of request #%s failed: %s", req.pk, exc)
            return _deployment_fail(req.pk, reason=str(exc)[:2000])
        if req.strategy == Strategy.CANARY:
            from rollouts.executor import canary_start

            try:
                return canary_start(req.pk, digest=digest)
            except Conflict as exc:  # the stable went away since the request was made
                return _deployment_fail(req.pk, reason=str(exc))
        req = _deployment_promote(req.pk, digest=digest)
    if req.status == Status.LIVE and deployment is not None:
        _sync_alias(req)
    return req


def _lapsed_reason(attempts: int) -> str:
    return (
        f"the deployment was abandoned {attempts} times (its worker stopped before finishing); "
        f"giving up after {settings.DEPLOY_MAX_ATTEMPTS} attempts"
    )


@transaction.atomic
def _deployment_begin(request_id: int) -> tuple[DeploymentRequest, Deployment | None, bool]:
    """Claim the request for this deploy task; returns (request, its deployment, claimed)."""
    req = _locked_request(request_id)
    now = timezone.now()
    claimed = False
    if req.status == Status.APPROVED:
        old = _transition(req, Status.DEPLOYING)
        _audit(
            req, "deployment.started", None, before={"status": old}, after={"status": req.status}
        )
        claimed = True
    elif req.status == Status.DEPLOYING and (
        req.deploy_lease_until is None or req.deploy_lease_until <= now
    ):
        if req.deploy_attempts >= settings.DEPLOY_MAX_ATTEMPTS:
            return _deployment_fail(req.pk, reason=_lapsed_reason(req.deploy_attempts)), None, False
        _audit(
            req,
            "deployment.reclaimed",
            None,
            before={"attempts": req.deploy_attempts, "lease_until": str(req.deploy_lease_until)},
            after={"attempts": req.deploy_attempts + 1},
        )
        claimed = True
    if claimed:
        req.deploy_attempts += 1
        req.deploy_lease_until = now + deploy_lease()
        req.save(update_fields=["deploy_attempts", "deploy_lease_until", "updated_at"])
    if req.status not in (Status.DEPLOYING, Status.LIVE):
        return req, None, False
    if claimed:
        rollout = _locked_rollout(req)
        if rollout.state == Rollout.State.PENDING:
            _rollout_transition(rollout, Rollout.State.PROGRESSING)
        RolloutStep.objects.filter(rollout=rollout, index=0, started_at__isnull=True).update(
            started_at=now
        )
    deployment, _ = Deployment.objects.get_or_create(
        request=req, defaults={"endpoint": req.endpoint, "model_version": req.model_version}
    )
    return req, deployment, claimed


def _smoke_test(model_version: ModelVersion) -> str:
    """Load the version, predict on its input example; returns its artifact digest.

    Raises any error of loading or predicting, with a message that says which step failed.
    """
    from rollouts.serving.schema import InputError, parse_request, predictions_to_jsonable

    name, number = model_version.registered_model.name, model_version.version
    example = model_version.input_example
    if not example:
        raise RuntimeError(f"{model_version} has no input example to smoke-test it with.")
    model = mlflow_client.load_pyfunc(name, number)
    try:
        parsed = parse_request(
            json.dumps(example).encode(), "application/json", model_version.signature
        )
    except InputError as exc:
        raise RuntimeError(
            f"the input example does not match the signature: {exc.message}"
        ) from exc
    try:
        raw = (
            model.predict(parsed.frame, params=parsed.params)
            if parsed.params
            else model.predict(parsed.frame)
        )
    except Exception as exc:
        raise RuntimeError(
            f"smoke test failed: predict raised {type(exc).__name__}: {exc}"
        ) from exc
    predictions = predictions_to_jsonable(raw)
    if len(predictions) != len(parsed.frame):
        raise RuntimeError(
            f"smoke test failed: {len(parsed.frame)} input rows gave {len(predictions)} predictions"
        )
    return mlflow_client.artifact_digest(name, number)


@transaction.atomic
def _deployment_fail(request_id: int, *, reason: str) -> DeploymentRequest:
    req = _locked_request(request_id)
    if req.status != Status.DEPLOYING:
        return req
    old = _transition(req, Status.FAILED, reason=reason)
    # Never live, so it never had traffic: only traffic_set gives weight, and only to live rows.
    Deployment.objects.filter(request=req).update(
        status=Deployment.Status.FAILED, failure_reason=reason
    )
    _rollout_end(req, Rollout.State.ABORTED, reason=reason)
    _audit(
        req,
        "deployment.failed",
        None,
        before={"status": old},
        after={"status": req.status, "reason": reason},
    )
    _notify(req.pk, "failed")
    return req


# --- Traffic -----------------------------------------------------------------------------------


def _serving(deployments: list[Deployment]) -> dict[str, int]:
    """``{"v<version>": percent}`` of the deployments that carry traffic: the shape of the
    ``traffic.changed`` audit event's ``before`` and ``after`` and of the timeline."""
    return {
        f"v{d.model_version.version}": d.traffic_weight
        for d in sorted(deployments, key=lambda d: d.pk)
        if d.traffic_weight > 0
    }


def _split_problem(split: object) -> str:
    if not isinstance(split, dict) or not split:
        return "A traffic split maps deployment ids to percent weights; it cannot be empty."
    for key, weight in split.items():
        if isinstance(key, bool) or not isinstance(key, int):
            return f"Deployment ids are integers; got {key!r}."
        if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight <= 100:
            return (
                f"The weight of deployment #{key} is {weight!r}; a weight is an integer 0 to 100."
            )
    total = sum(split.values())
    if total != 100:
        return f"The weights add up to {total}; they must add up to 100."
    return ""


@transaction.atomic
def traffic_set(
    *,
    endpoint: Endpoint | int,
    split: dict[int, int],
    actor: User | None,
    reason: str,
    rollout_step: RolloutStep | None = None,
) -> TrafficHistory:
    """Set an endpoint's traffic split: the one writer of ``Deployment.traffic_weight``.

    ``split`` maps ids of the endpoint's deployments to percent of its requests (integers 0 to
    100 adding up to 100); every deployment of the endpoint not in it gets 0. The endpoint's
    live stable (``selectors.stable_of``) must be in it with a weight above 0, and only live
    deployments may get weight. Locks the endpoint row, so concurrent writers apply one after
    the other; the caller changes statuses and roles first, in the same transaction.

    Writes one :class:`TrafficHistory` row (``reason``, ``actor``: None is the system, and the
    ``rollout_step`` that set it, None for a rollback) and one
    ``traffic.changed`` audit event whose ``before`` and ``after`` are ``{"traffic": {"v1":
    100}}``, the versions that carried traffic before and after. Returns the history row.

    Raises:
        ValidationError: a split that is not such a mapping, weights that are not integers 0 to
            100 or do not add up to 100, a deployment that is not this endpoint's, weight to a
            deployment that is not live, no live stable, stable missing or at 0, a blank
            ``reason``, or a ``rollout_step`` of another endpoint. Nothing is written then.
    """
    endpoint_id = endpoint if isinstance(endpoint, int) else endpoint.pk
    endpoint = (
        Endpoint.objects.select_for_update()
        .select_related("environment", "registered_model")
        .get(pk=endpoint_id)
    )
    if problem := _split_problem(split):
        raise ValidationError({"split": problem})
    if not reason.strip():
        raise ValidationError({"reason": "Say why the traffic changes."})
    if (
        rollout_step is not None
        and not Rollout.objects.filter(
            pk=rollout_step.rollout_id, request__endpoint_id=endpoint.pk
        ).exists()
    ):
        raise ValidationError(
            {"rollout_step": f"{rollout_step} is not a step of a rollout on {endpoint.name}."}
        )
    deployments = list(
        endpoint.deployments.select_for_update()
        .filter(models.Q(pk__in=list(split)) | models.Q(traffic_weight__gt=0))
        .select_related("model_version")
    )
    by_pk = {d.pk: d for d in deployments}
    strangers = sorted(set(split) - set(by_pk))
    if strangers:
        raise ValidationError(
            {"split": f"Deployment #{strangers[0]} is not a deployment of {endpoint.name}."}
        )
    not_live = sorted(
        pk for pk, w in split.items() if w > 0 and by_pk[pk].status != Deployment.Status.LIVE
    )
    if not_live:
        d = by_pk[not_live[0]]
        raise ValidationError(
            {
                "split": f"Deployment #{d.pk} (v{d.model_version.version}) is {d.status}; only "
                "live deployments take traffic."
            }
        )
    stable = stable_of(endpoint)
    if stable is None:
        raise ValidationError({"split": f"{endpoint.name} has no live stable deployment."})
    if split.get(stable.pk, 0) == 0:
        raise ValidationError(
            {
                "split": f"The split gives no weight to the stable deployment #{stable.pk} "
                f"(v{stable.model_version.version}) of {endpoint.name}."
            }
        )
    before = _serving(deployments)
    for d in deployments:
        weight = split.get(d.pk, 0)
        if d.traffic_weight != weight:
            d.traffic_weight = weight
            d.save(update_fields=["traffic_weight"])
    after = _serving(deployments)
    user = actor if actor is not None and actor.is_authenticated else None
    history = TrafficHistory.objects.create(
        endpoint=endpoint,
        split=after,
        deployment_split={str(pk): weight for pk, weight in sorted(split.items())},
        reason=reason.strip(),
        rollout_step=rollout_step,
        actor=user,
        actor_label=user.get_username() if user else "system",
        created_at=timezone.now(),
    )
    audit_record(
        actor=actor,
        action="traffic.changed",
        obj=endpoint,
        registered_model=endpoint.registered_model.name,
        environment=endpoint.environment.name,
        before={"traffic": before},
        after={"traffic": after},
    )
    return history


def _deployment_go_live(
    req: DeploymentRequest, *, role: str, digest: str, now, status: str, action: str, **extra
) -> Deployment:
    """The request's deployment serves from now (``role``, pinned to ``digest``) and the
    request moves to ``status`` with one ``action`` audit event; the caller sets the traffic."""
    deployment = Deployment.objects.select_for_update().get(request=req)
    deployment.status, deployment.role = Deployment.Status.LIVE, role
    deployment.artifact_digest, deployment.live_at = digest, now
    deployment.save(update_fields=["status", "role", "artifact_digest", "live_at"])
    old = _transition(req, status)
    _audit(
        req,
        action,
        None,
        before={"status": old},
        after={"status": req.status, "artifact_digest": digest, **extra},
    )
    return deployment


def _retire_superseded(previous: Deployment, *, by: DeploymentRequest, actor, now) -> None:
    """Retire a live deployment that ``by`` replaces; its request becomes superseded. The
    caller moves the traffic (``traffic_set``) in the same transaction."""
    previous.status, previous.retired_at = Deployment.Status.RETIRED, now
    previous.save(update_fields=["status", "retired_at"])
    old_req = _locked_request(previous.request_id)
    if old_req.status == Status.LIVE:
        _transition(old_req, Status.SUPERSEDED, reason=f"replaced by request #{by.pk}")
        _audit(
            old_req,
            "request.superseded",
            actor,
            before={"status": Status.LIVE},
            after={"status": old_req.status},
        )


@transaction.atomic
def _deployment_promote(request_id: int, *, digest: str) -> DeploymentRequest:
    """Direct strategy: the new version becomes stable and takes 100% of the endpoint's traffic
    in one step."""
    req = _locked_request(request_id)
    if req.status != Status.DEPLOYING:
        return req
    endpoint = Endpoint.objects.select_for_update().get(pk=req.endpoint_id)
    now = timezone.now()
    for previous in (
        endpoint.deployments.select_for_update()
        .filter(status=Deployment.Status.LIVE)
        .exclude(request=req)
    ):
        # Its traffic goes below, in the same transaction (traffic_set gives it 0).
        _retire_superseded(previous, by=req, actor=None, now=now)
    deployment = _deployment_go_live(
        req, role=Deployment.Role.STABLE, digest=digest, now=now, status=Status.LIVE,
        action="deployment.live",
    )  # fmt: skip
    rollout = _locked_rollout(req)
    step = rollout.steps.get(index=0)
    traffic_set(
        endpoint=endpoint,
        split={deployment.pk: 100},
        actor=None,
        reason=f"request #{req.pk} went live (direct)",
        rollout_step=step,
    )
    _rollout_end(req, Rollout.State.SUCCEEDED)
    _notify(req.pk, "live")
    return req


def deployment_rollback(
    *, endpoint_id: int, actor: User | None, reason: str, to_version: int | None = None
) -> DeploymentRequest:
    """Take the endpoint back to the release before its live one, or to ``to_version``, any
    version live on this endpoint before and replaced since (no approval needed): the live
    request becomes rolled back, the restored one is live again with 100% of traffic, and the
    environment's MLflow alias follows. During a canary, the canary is aborted instead.

    ``actor`` None is the system: an alert rule whose action is a rollback (rules are set by
    platform admins); it is recorded as ``system`` in the audit trail.

    Raises:
        PermissionDenied: a person who is not a reviewer or platform admin.
        ValidationError: no reason given.
        Conflict: nothing live, no earlier release to go back to, or ``to_version`` is live
            already or was never live on this endpoint and replaced since.
        mlflow_client.RegistryError: moving the alias failed (traffic has moved already).
    """
    restored = _rollback(endpoint_id, actor, reason, to_version)
    _sync_alias(restored, actor=actor)
    return restored


@transaction.atomic
def _rollback(
    endpoint_id: int, actor: User | None, reason: str, to_version: int | None = None
) -> DeploymentRequest:
    if actor is not None and not (can_review(actor) or is_platform_admin(actor)):
        raise PermissionDenied("Only reviewers and platform admins can roll back.")
    if not reason.strip():
        raise ValidationError({"reason": "Say why the release is rolled back."})
    endpoint = (
        Endpoint.objects.select_for_update()
        .select_related("environment", "registered_model")
        .get(pk=endpoint_id)
    )
    canary = Deployment.objects.filter(
        endpoint=endpoint, status=Deployment.Status.LIVE, role=Deployment.Role.CANARY,
        request__status=Status.ROLLING_OUT,
    ).first()  # fmt: skip
    if canary is not None:  # rolling back during a canary aborts it: stable serves everything
        from rollouts.executor import _abort

        rollout = Rollout.objects.select_for_update().get(request_id=canary.request_id)
        who = actor.get_username() if actor is not None else "an alert rule"
        _abort(
            rollout,
            _locked_request(canary.request_id),
            reason=f"rolled back by {who}: {reason.strip()}",
            actor=actor,
        )
        return _locked_request(stable_of(endpoint).request_id)
    stable = stable_of(endpoint)
    live = (
        endpoint.deployments.select_for_update().get(pk=stable.pk) if stable is not None else None
    )
    if live is None:
        raise Conflict(f"Nothing is live on {endpoint.name}.")
    candidates = (
        endpoint.deployments.select_for_update()
        .filter(status=Deployment.Status.RETIRED, request__status=Status.SUPERSEDED)
        .exclude(model_version=live.model_version)
        .order_by("-retired_at")
    )
    if to_version is not None:
        if to_version == live.model_version.version:
            raise Conflict(f"v{to_version} is what {endpoint.name} serves already.")
        candidates = candidates.filter(model_version__version=to_version)
    previous = candidates.first()
    if previous is None:
        raise Conflict(
            f"v{to_version} was never live on {endpoint.name} and replaced since; only such a "
            "version can be restored without a request."
            if to_version is not None
            else f"{endpoint.name} has no earlier release to roll back to."
        )
    now = timezone.now()
    # Statuses and roles first; traffic_set moves the weights below, in this transaction.
    live.status, live.retired_at = Deployment.Status.RETIRED, now
    live.save(update_fields=["status", "retired_at"])
    previous.status, previous.role, previous.retired_at = (
        Deployment.Status.LIVE,
        Deployment.Role.STABLE,
        None,
    )
    previous.save(update_fields=["status", "role", "retired_at"])
    rolled = _locked_request(live.request_id)
    old = _transition(rolled, Status.ROLLED_BACK, reason=reason.strip())
    _audit(
        rolled,
        "deployment.rolled_back",
        actor,
        before={"status": old},
        after={"status": rolled.status, "reason": reason.strip()},
    )
    restored = _locked_request(previous.request_id)
    old = _transition(
        restored, Status.LIVE, reason=f"restored by rolling back request #{rolled.pk}"
    )
    _audit(
        restored,
        "deployment.restored",
        actor,
        before={"status": old},
        after={"status": restored.status},
    )
    traffic_set(
        endpoint=endpoint,
        split={previous.pk: 100},
        actor=actor,
        reason=f"rollback of request #{rolled.pk}: {reason.strip()}",
    )
    _notify(rolled.pk, "rolled_back")
    return restored


def _sync_alias(req: DeploymentRequest, actor: User | None = None) -> None:
    """Point the environment's MLflow alias at the live version, unless a newer deployment
    has replaced this one meanwhile."""
    live = Deployment.objects.filter(
        endpoint=req.endpoint, status=Deployment.Status.LIVE, request=req
    ).exists()
    alias = req.endpoint.environment.name
    mv = req.model_version
    if live and mv.registered_model.aliases.get(alias) != mv.version:
        registry_set_alias(model_version=mv, alias=alias, actor=actor)


# --- API keys ----------------------------------------------------------------------------------

API_KEY_PREFIX = "rg_"


def api_key_hash(raw_key: str) -> str:
    """sha256 hex of the key. Keys carry 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_validate(
    name: str, endpoints: list[Endpoint], rate_limit_per_minute: int | None
) -> None:
    """Raises ValidationError naming each bad field: a blank name, no endpoint, a rate limit
    outside 1..1,000,000 requests a minute (None is unlimited)."""
    errors = {}
    if not name.strip():
        errors["name"] = "Name the key after the client that will use it."
    if not endpoints:
        errors["endpoints"] = "Scope the key to at least one endpoint."
    if rate_limit_per_minute is not None and not 1 <= rate_limit_per_minute <= 1_000_000:
        errors["rate_limit_per_minute"] = (
            "A rate limit is 1 to 1,000,000 requests per minute; leave it empty for none."
        )
    if errors:
        raise ValidationError(errors)


def _api_key_state(key: ApiKey) -> dict[str, Any]:
    return {
        "name": key.name,
        "endpoints": sorted(e.name for e in key.endpoints.all()),
        "rate_limit_per_minute": key.rate_limit_per_minute,
    }


@transaction.atomic
def api_key_create(
    *,
    name: str,
    endpoints: list[Endpoint],
    created_by: User | None,
    rate_limit_per_minute: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key scoped to ``endpoints``, allowed ``rate_limit_per_minute`` scoring requests
    a minute (None: unlimited). Returns the row and the plaintext key, which is shown once and
    never stored. ``created_by`` None is the system (seed, management command).

    Raises: PermissionDenied (a person who is not a platform admin), ValidationError (no name,
    no endpoint, a rate limit outside 1..1,000,000).
    """
    if created_by is not None and not is_platform_admin(created_by):
        raise PermissionDenied("Only platform admins can create API keys.")
    api_key_validate(name, endpoints, rate_limit_per_minute)
    raw = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        name=name.strip(),
        prefix=raw[:10],
        key_hash=api_key_hash(raw),
        created_by=created_by,
        rate_limit_per_minute=rate_limit_per_minute,
    )
    key.endpoints.set(endpoints)
    audit_record(actor=created_by, action="api_key.created", obj=key, after=_api_key_state(key))
    return key, raw


@transaction.atomic
def api_key_update(*, key_id: int, actor: User | None, changes: dict[str, Any]) -> ApiKey:
    """Change a key's ``name``, ``endpoints`` (a list of Endpoint) or ``rate_limit_per_minute``
    (None: unlimited). Every serving process applies the change within
    ``SERVING_ROUTE_TTL_S``; this one at once.

    Raises: PermissionDenied (not a platform admin), ValidationError (an unknown field, or
    values :func:`api_key_create` refuses), Conflict (the key is revoked).
    """
    if actor is not None and not is_platform_admin(actor):
        raise PermissionDenied("Only platform admins can change API keys.")
    unknown = set(changes) - {"name", "endpoints", "rate_limit_per_minute"}
    if unknown:
        raise ValidationError({f: "This field cannot be changed." for f in sorted(unknown)})
    key = ApiKey.objects.select_for_update().get(pk=key_id)
    if key.revoked_at is not None:
        raise Conflict(f"The key {key} is revoked; create a new one instead.")
    before = _api_key_state(key)
    name = changes.get("name", key.name)
    endpoints = list(changes.get("endpoints", key.endpoints.all()))
    limit = changes.get("rate_limit_per_minute", key.rate_limit_per_minute)
    api_key_validate(name, endpoints, limit)
    key.name, key.rate_limit_per_minute = name.strip(), limit
    key.save(update_fields=["name", "rate_limit_per_minute"])
    key.endpoints.set(endpoints)
    after = _api_key_state(key)
    changed = sorted(f for f in after if after[f] != before[f])
    if changed:
        audit_record(
            actor=actor,
            action="api_key.changed",
            obj=key,
            before={f: before[f] for f in changed},
            after={f: after[f] for f in changed},
        )
        from rollouts.serving.runtime import keys

        keys.invalidate()
    return key


@transaction.atomic
def api_key_revoke(*, key_id: int, actor: User | None) -> ApiKey:
    """Raises PermissionDenied for a person who is not a platform admin."""
    if actor is not None and not is_platform_admin(actor):
        raise PermissionDenied("Only platform admins can revoke API keys.")
    key = ApiKey.objects.select_for_update().get(pk=key_id)
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.save(update_fields=["revoked_at"])
        audit_record(actor=actor, action="api_key.revoked", obj=key)
        # This process forgets the key at once; other serving processes within
        # SERVING_ROUTE_TTL_S (their key tables expire per key).
        from rollouts.serving.runtime import keys

        keys.invalidate()  # harmless if the transaction rolls back: the table reloads
    return key


def deployment_requests_redispatch(*, older_than: timedelta = timedelta(minutes=2)) -> list[int]:
    """Queue again the work the database says nobody is doing: pending gates and
    approved-but-not-deploying requests unchanged for ``older_than`` (their task never reached a
    worker), and deploying requests whose deploy lease lapsed (their worker died; the broker may
    redeliver the message only after its visibility timeout, or never). A lapsed request that
    used up ``DEPLOY_MAX_ATTEMPTS`` is marked failed here, with no worker needed. Safe to
    repeat: the tasks are idempotent and a deploy claims its request first. Returns the request
    ids queued or failed."""
    from rollouts import tasks

    now = timezone.now()
    cutoff = now - older_than
    stuck = list(
        DeploymentRequest.objects.filter(
            status__in=[Status.PENDING_GATES, Status.APPROVED], updated_at__lt=cutoff
        ).values_list("pk", "status")
    )
    abandoned = DeploymentRequest.objects.filter(status=Status.DEPLOYING).filter(
        models.Q(deploy_lease_until__lte=now) | models.Q(deploy_lease_until__isnull=True)
    )
    done = []
    for pk, attempts in abandoned.values_list("pk", "deploy_attempts"):
        if attempts >= settings.DEPLOY_MAX_ATTEMPTS:
            with transaction.atomic():
                _deployment_fail_lapsed(pk)
            done.append(pk)
        else:
            stuck.append((pk, Status.DEPLOYING))
    for pk, status in stuck:
        task = tasks.run_gates if status == Status.PENDING_GATES else tasks.execute_deployment
        if enqueue(task, pk):
            done.append(pk)
    return done


def _deployment_fail_lapsed(request_id: int) -> None:
    req = _locked_request(request_id)
    lapsed = req.deploy_lease_until is None or req.deploy_lease_until <= timezone.now()
    if req.status == Status.DEPLOYING and lapsed:
        _deployment_fail(req.pk, reason=_lapsed_reason(req.deploy_attempts))

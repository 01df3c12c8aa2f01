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

from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone
from django.utils.text import slugify

from portal.audit import audit_record
from portal.errors import Conflict
from portal.roles import can_request_deployment, can_review
from registry import mlflow_client
from registry.models import ModelVersion
from registry.services import registry_set_alias
from rollouts.models import (
    ApiKey,
    Deployment,
    DeploymentRequest,
    Endpoint,
    Environment,
    Review,
    Strategy,
)

logger = logging.getLogger(__name__)
Status = DeploymentRequest.Status


class InvalidTransition(Conflict):
    """The request is not in a state that allows this action (HTTP 409)."""


class SeparationOfDutiesError(PermissionDenied):
    """The requester of a deployment tried to review it (HTTP 403)."""


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


@transaction.atomic
def deployment_request_create(
    *,
    requester: User,
    model_version: ModelVersion,
    environment: Environment,
    strategy: str = Strategy.DIRECT,
    justification: str,
) -> DeploymentRequest:
    """Open a request to deploy ``model_version`` to its endpoint in ``environment``.

    Raises:
        PermissionDenied: the user is not a data scientist.
        ValidationError: unknown strategy, empty justification, a version MLflow has not marked
            READY, or an open request for the same version and endpoint.
    """
    if not can_request_deployment(requester):
        raise PermissionDenied("Only data scientists can request deployments.")
    if strategy not in Strategy.values:
        raise ValidationError({"strategy": f"Unknown strategy {strategy!r}."})
    if not justification.strip():
        raise ValidationError({"justification": "Say why this version should be deployed."})
    if model_version.status != "READY":
        raise ValidationError(
            {"model_version": f"{model_version} is {model_version.status or 'not ready'} in MLflow."}
        )
    endpoint = endpoint_for(model_version=model_version, environment=environment)
    # Lock the endpoint row so that concurrent creates for it queue here: on PostgreSQL a
    # select_for_update() that matches no open request locks nothing, so without this two
    # requests could both pass the duplicate check below.
    Endpoint.objects.select_for_update().get(pk=endpoint.pk)
    open_request = (
        DeploymentRequest.objects.select_for_update()
        .filter(model_version=model_version, endpoint=endpoint, status__in=DeploymentRequest.ACTIVE)
        .first()
    )
    if open_request is not None:
        raise ValidationError(
            {"model_version": f"Request #{open_request.pk} for this version is already open."}
        )
    req = DeploymentRequest.objects.create(
        model_version=model_version,
        endpoint=endpoint,
        strategy=strategy,
        justification=justification.strip(),
        requester=requester,
    )
    audit_record(
        actor=requester,
        action="request.created",
        obj=req,
        after={
            "status": req.status,
            "model": model_version.registered_model.name,
            "version": model_version.version,
            "environment": environment.name,
            "endpoint": endpoint.name,
            "strategy": strategy,
        },
    )
    return req


def _check_reviewer(req: DeploymentRequest, reviewer: User) -> None:
    if req.requester_id == reviewer.pk:
        raise SeparationOfDutiesError("You requested this deployment, so you cannot review it.")
    if not can_review(reviewer):
        raise PermissionDenied("Only reviewers can approve or reject deployment requests.")


@transaction.atomic
def deployment_request_approve(*, request_id: int, reviewer: User, comment: str = "") -> DeploymentRequest:
    """Approve a request and, once the transaction commits, launch its deployment.

    Raises:
        DeploymentRequest.DoesNotExist: no such request.
        SeparationOfDutiesError / PermissionDenied: the reviewer may not review it (403).
        InvalidTransition: the request is no longer awaiting review (409).
    """
    from rollouts import tasks

    req = _locked_request(request_id)
    _check_reviewer(req, reviewer)
    old = _transition(req, Status.APPROVED)
    Review.objects.create(request=req, reviewer=reviewer, decision=Review.Decision.APPROVE, comment=comment)
    audit_record(
        actor=reviewer,
        action="request.approved",
        obj=req,
        before={"status": old},
        after={"status": req.status, "comment": comment},
    )
    transaction.on_commit(lambda: tasks.execute_deployment.delay(req.pk))
    return req


@transaction.atomic
def deployment_request_reject(*, request_id: int, reviewer: User, comment: str) -> DeploymentRequest:
    """Reject a request; a comment is required so the requester learns why.

    Raises: as :func:`deployment_request_approve`, and ValidationError without a comment.
    """
    if not comment.strip():
        raise ValidationError({"comment": "Say why the request is rejected."})
    req = _locked_request(request_id)
    _check_reviewer(req, reviewer)
    old = _transition(req, Status.REJECTED, reason=comment.strip())
    Review.objects.create(request=req, reviewer=reviewer, decision=Review.Decision.REJECT, comment=comment)
    audit_record(
        actor=reviewer,
        action="request.rejected",
        obj=req,
        before={"status": old},
        after={"status": req.status, "comment": comment},
    )
    return req


@transaction.atomic
def deployment_request_cancel(*, request_id: int, actor: User) -> DeploymentRequest:
    """The requester withdraws a request before its deployment starts.

    Raises: PermissionDenied (not the requester), InvalidTransition (already deploying or done).
    """
    req = _locked_request(request_id)
    if req.requester_id != actor.pk:
        raise PermissionDenied("Only the requester can cancel a request.")
    old = _transition(req, Status.CANCELLED, reason=f"cancelled by {actor.get_username()}")
    audit_record(actor=actor, action="request.cancelled", obj=req, before={"status": old}, after={"status": req.status})
    return req


# --- Deployment execution (called by the Celery task) ----------------------------------------


def deployment_execute(*, request_id: int) -> DeploymentRequest:
    """Deploy an approved request: load the version, smoke-test it on its input example, pin its
    artifact digest, make it the endpoint's live version and move the environment's alias.

    Idempotent: run twice, or again after a worker died mid-way, it converges to the same end
    state. A failed smoke test marks the request failed and leaves the previous version live.

    Raises:
        mlflow_client.RegistryError: only when moving the alias failed (the task retries); the
            deployment itself is already live by then.
    """
    req, deployment = _deployment_begin(request_id)
    if req.status == Status.DEPLOYING:
        try:
            digest = _smoke_test(req.model_version)
        except Exception as exc:  # any failure of a model we were asked to launch is its failure
            logger.warning("deployment of request #%s failed: %s", req.pk, exc)
            return _deployment_fail(req.pk, reason=str(exc)[:2000])
        req = _deployment_promote(req.pk, digest=digest)
    if req.status == Status.LIVE and deployment is not None:
        _sync_alias(req)
    return req


@transaction.atomic
def _deployment_begin(request_id: int) -> tuple[DeploymentRequest, Deployment | None]:
    req = _locked_request(request_id)
    if req.status == Status.APPROVED:
        old = _transition(req, Status.DEPLOYING)
        audit_record(actor=None, action="deployment.started", obj=req, before={"status": old}, after={"status": req.status})
    if req.status not in (Status.DEPLOYING, Status.LIVE):
        return req, None
    deployment, _ = Deployment.objects.get_or_create(
        request=req, defaults={"endpoint": req.endpoint, "model_version": req.model_version}
    )
    return req, deployment


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
        parsed = parse_request(json.dumps(example).encode(), "application/json", model_version.signature)
    except InputError as exc:
        raise RuntimeError(f"the input example does not match the signature: {exc.message}") from exc
    try:
        raw = model.predict(parsed.frame, params=parsed.params) if parsed.params else model.predict(parsed.frame)
    except Exception as exc:
        raise RuntimeError(f"smoke test failed: predict raised {type(exc).__name__}: {exc}") from exc
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
    Deployment.objects.filter(request=req).update(status=Deployment.Status.FAILED, failure_reason=reason, traffic_weight=0)
    audit_record(actor=None, action="deployment.failed", obj=req, before={"status": old}, after={"status": req.status, "reason": reason})
    return req


def _traffic(endpoint: Endpoint) -> dict[str, int]:
    return {
        f"v{d.model_version.version}": d.traffic_weight
        for d in endpoint.deployments.filter(status=Deployment.Status.LIVE).select_related("model_version")
    }


@transaction.atomic
def _deployment_promote(request_id: int, *, digest: str) -> DeploymentRequest:
    """Direct strategy: the new version takes 100% of the endpoint's traffic in one step."""
    req = _locked_request(request_id)
    if req.status != Status.DEPLOYING:
        return req
    endpoint = Endpoint.objects.select_for_update().get(pk=req.endpoint_id)
    before = _traffic(endpoint)
    now = timezone.now()
    for previous in endpoint.deployments.select_for_update().filter(status=Deployment.Status.LIVE).exclude(request=req):
        previous.status, previous.traffic_weight, previous.retired_at = Deployment.Status.RETIRED, 0, now
        previous.save(update_fields=["status", "traffic_weight", "retired_at"])
        old_req = _locked_request(previous.request_id)
        if old_req.status == Status.LIVE:
            _transition(old_req, Status.SUPERSEDED, reason=f"replaced by request #{req.pk}")
            audit_record(actor=None, action="request.superseded", obj=old_req, before={"status": Status.LIVE}, after={"status": old_req.status})
    Deployment.objects.filter(request=req).update(
        status=Deployment.Status.LIVE, traffic_weight=100, artifact_digest=digest, live_at=now
    )
    old = _transition(req, Status.LIVE)
    audit_record(actor=None, action="deployment.live", obj=req, before={"status": old}, after={"status": req.status, "artifact_digest": digest})
    audit_record(actor=None, action="traffic.changed", obj=endpoint, before={"traffic": before}, after={"traffic": _traffic(endpoint)})
    return req


def _sync_alias(req: DeploymentRequest) -> None:
    """Point the environment's MLflow alias at the live version, unless a newer deployment
    has replaced this one meanwhile."""
    live = Deployment.objects.filter(endpoint=req.endpoint, status=Deployment.Status.LIVE, request=req).exists()
    alias = req.endpoint.environment.name
    mv = req.model_version
    if live and mv.registered_model.aliases.get(alias) != mv.version:
        registry_set_alias(model_version=mv, alias=alias, actor=None)


# --- API keys ----------------------------------------------------------------------------------

API_KEY_PREFIX = "rg_"


def api_key_hash(raw_key: str) -> str:
    """sha256 hex of the key. Keys carry 256 random bits, so a fast hash is enough."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


@transaction.atomic
def api_key_create(*, name: str, endpoints: list[Endpoint], created_by: User | None) -> tuple[ApiKey, str]:
    """Create a key scoped to ``endpoints``. Returns the row and the plaintext key, which is
    shown once and never stored."""
    if not name.strip():
        raise ValidationError({"name": "Name the key after the client that will use it."})
    raw = API_KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(name=name.strip(), prefix=raw[:10], key_hash=api_key_hash(raw), created_by=created_by)
    key.endpoints.set(endpoints)
    audit_record(actor=created_by, action="api_key.created", obj=key, after={"endpoints": [e.name for e in endpoints]})
    return key, raw


@transaction.atomic
def api_key_revoke(*, key_id: int, actor: User | None) -> ApiKey:
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


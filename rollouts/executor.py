"""The rollout executor: advances a canary one step at a time (issue 10).

A canary request, once its deploy task has smoke-tested the version, becomes *rolling out*: the
new version serves as the endpoint's canary at the first planned weight beside the stable one
(``canary_start``). Each analysed step is then judged after its interval by the canary analysis
(``rollouts.analysis``, implemented in ``monitoring``) on the two deployments' own rows of the
step's window, and ``rollout_advance`` acts on the verdict:

- pass: the next step's weight (the last, 100 %, promotes the canary to stable);
- fail: abort by itself: the canary to 0 % and retired, stable untouched, the request rolled
  back with the failing figures as its reason;
- inconclusive: the step is extended by one interval, up to ``max_extensions``, then the
  rollout waits for a person (paused). No data is never a pass.

Coordination is in the database: ``rollout_advance`` first claims the rollout with one
conditional UPDATE (due, not leased, or its lease lapsed), so a duplicated task message or two
workers change nothing twice; the verdict, the step's end and the traffic change are written
in one transaction. Beat (``rollouts.tasks.advance_rollouts``) sends the rollouts that are due,
so a rollout goes on after its worker was killed.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import User
from django.db import models, transaction
from django.utils import timezone

from portal.errors import Conflict
from portal.leases import new_holder
from portal.roles import can_review, is_platform_admin
from portal.tasking import BROKER_ERRORS
from rollouts import analysis, strategies
from rollouts.models import Deployment, DeploymentRequest, Endpoint, Rollout, RolloutStep
from rollouts.selectors import stable_of
from rollouts.services import (
    _audit,
    _deployment_go_live,
    _locked_request,
    _notify,
    _retire_superseded,
    _rollout_transition,
    _sync_alias,
    _transition,
    traffic_set,
)

logger = logging.getLogger(__name__)
Status = DeploymentRequest.Status


def rollout_lease() -> timedelta:
    """How long a claim on a rollout lasts (``ROLLOUT_LEASE_S``); a worker killed while it holds
    one is presumed dead after it."""
    return timedelta(seconds=settings.ROLLOUT_LEASE_S)


def _policy(req: DeploymentRequest) -> analysis.AnalysisPolicy:
    return analysis.AnalysisPolicy(**(req.endpoint.environment.analysis_policy or {}))


def _split(stable: Deployment, canary: Deployment, weight: int) -> dict[int, int]:
    return {stable.pk: 100 - weight, canary.pk: weight}


@transaction.atomic
def canary_start(request_id: int, *, digest: str) -> DeploymentRequest:
    """After the smoke test: the request's deployment goes live as the endpoint's canary at the
    first step's weight; the request becomes rolling out and its first check is scheduled.

    Raises Conflict when the endpoint has no live stable to compare with (the request's
    deploy then fails with that reason)."""
    req = _locked_request(request_id)
    if req.status != Status.DEPLOYING:
        return req
    endpoint = Endpoint.objects.select_for_update().get(pk=req.endpoint_id)
    stable = stable_of(endpoint)
    if stable is None:
        raise Conflict(f"{endpoint.name} has no live stable version for a canary to compare with.")
    rollout = Rollout.objects.select_for_update().get(request=req)
    step = rollout.steps.get(index=0)
    now = timezone.now()
    canary = _deployment_go_live(
        req, role=Deployment.Role.CANARY, digest=digest, now=now, status=Status.ROLLING_OUT,
        action="rollout.started", plan=req.strategy_params,
    )  # fmt: skip
    traffic_set(
        endpoint=endpoint,
        split=_split(stable, canary, step.planned_weight),
        actor=None,
        reason=f"canary of request #{req.pk}: step 1, {step.planned_weight}%",
        rollout_step=step,
    )
    RolloutStep.objects.filter(pk=step.pk).update(started_at=now)
    rollout.next_check_at = now + timedelta(seconds=req.strategy_params["interval_s"])
    rollout.save(update_fields=["next_check_at", "updated_at"])
    _notify_advance_on_commit(rollout.pk, countdown=req.strategy_params["interval_s"])
    transaction.on_commit(lambda: challenger_alias_sync(req.pk))
    return req


#: The MLflow alias that names a running canary (removed when its rollout ends).
CHALLENGER = "challenger"


def challenger_alias_sync(request_id: int) -> None:
    """MLflow's ``challenger`` alias follows the truth: it names the request's version while
    the request is rolling out, and is removed (if still its) when the rollout ends. A failure
    to reach MLflow is logged; the next change of the rollout tries again."""
    from registry.services import registry_delete_alias, registry_set_alias

    req = DeploymentRequest.objects.select_related("model_version__registered_model").get(
        pk=request_id
    )
    mv = req.model_version
    model = mv.registered_model
    try:
        if req.status == Status.ROLLING_OUT:
            if model.aliases.get(CHALLENGER) != mv.version:
                registry_set_alias(model_version=mv, alias=CHALLENGER, actor=None)
        elif model.aliases.get(CHALLENGER) == mv.version:
            registry_delete_alias(registered_model=model, alias=CHALLENGER, actor=None)
    except Exception:  # RegistryError, or MLflow unreachable
        logger.warning("challenger alias of request #%s not synced", request_id, exc_info=True)


def _notify_advance_on_commit(rollout_id: int, *, countdown: float) -> None:
    from rollouts import tasks

    def send():
        try:
            tasks.advance_rollout.apply_async(args=[rollout_id], countdown=countdown)
        except BROKER_ERRORS:  # the broker is down: beat sends it when it is due
            logger.warning("could not queue rollout #%s; beat will", rollout_id, exc_info=True)

    transaction.on_commit(send)


def _claim(rollout_id: int, holder: str, *, force: bool = False) -> bool:
    """Take the rollout for this worker: one conditional UPDATE, so only one claimant wins."""
    now = timezone.now()
    due = models.Q() if force else models.Q(next_check_at__lte=now)
    return bool(
        Rollout.objects.filter(
            models.Q(lease_until__isnull=True) | models.Q(lease_until__lte=now),
            due,
            pk=rollout_id,
            state=Rollout.State.PROGRESSING,
        ).update(lease_owner=holder, lease_until=now + rollout_lease())
    )


def rollout_advance(*, rollout_id: int) -> Rollout:
    """Judge the step in progress of a due rollout and act on the verdict (module docstring).
    Does nothing for a rollout that is not due, not progressing, or claimed by another live
    worker. Returns the rollout as it is afterwards."""
    holder = new_holder()
    if not _claim(rollout_id, holder):
        return Rollout.objects.get(pk=rollout_id)
    try:
        rollout = Rollout.objects.select_related("request__endpoint__environment").get(
            pk=rollout_id
        )
        step = rollout.steps.filter(started_at__isnull=False, ended_at__isnull=True).first()
        req = rollout.request
        canary = Deployment.objects.get(request=req)
        stable = stable_of(req.endpoint)
        if step is None or stable is None or canary.status != Deployment.Status.LIVE:
            return _settle(rollout_id, holder, None, None, "nothing in progress to judge")
        now = timezone.now()
        engine = analysis.canary_analysis()
        planned = strategies.plan(req.strategy, req.strategy_params).steps
        looks = sum(1 for s in planned if s.analysed)
        figures = {
            role: engine.window_figures(deployment_id=d.pk, start=step.started_at, end=now)
            for role, d in (("canary", canary), ("stable", stable))
        }
        verdict = engine.judge(figures["canary"], figures["stable"], _policy(req), looks=looks)
        return _settle(rollout_id, holder, step.pk, verdict, "")
    except Exception:
        Rollout.objects.filter(pk=rollout_id, lease_owner=holder).update(lease_until=None)
        raise


@transaction.atomic
def _settle(rollout_id, holder, step_id, verdict, note) -> Rollout:
    rollout = Rollout.objects.select_for_update().get(pk=rollout_id)
    if rollout.lease_owner != holder or rollout.state != Rollout.State.PROGRESSING:
        return rollout  # our claim lapsed and another worker took over
    rollout.lease_owner, rollout.lease_until = "", None
    rollout.save(update_fields=["lease_owner", "lease_until", "updated_at"])
    if step_id is None:
        logger.warning("rollout #%s: %s", rollout_id, note)
        return rollout
    req = _locked_request(rollout.request_id)
    step = RolloutStep.objects.select_for_update().get(pk=step_id)
    params = req.strategy_params
    extensions = int(step.figures.get("extensions", 0))
    step.verdict = verdict.outcome
    step.figures = {**verdict.as_dict(), "extensions": extensions}
    if verdict.outcome == "inconclusive" and extensions < params["max_extensions"]:
        step.figures["extensions"] = extensions + 1
        step.save(update_fields=["verdict", "figures"])
        rollout.next_check_at = timezone.now() + timedelta(seconds=params["interval_s"])
        rollout.save(update_fields=["next_check_at", "updated_at"])
        _notify_advance_on_commit(rollout.pk, countdown=params["interval_s"])
        return rollout
    now = timezone.now()
    step.ended_at = now
    step.save(update_fields=["verdict", "figures", "ended_at"])
    if verdict.outcome == "fail":
        return _abort(rollout, req, reason=f"canary analysis failed: {verdict.reason}")
    if verdict.outcome == "inconclusive":
        rollout.next_check_at = None
        rollout.save(update_fields=["next_check_at", "updated_at"])
        _rollout_transition(
            rollout,
            Rollout.State.AWAITING_PERSON,
            reason=f"not enough data after {extensions} extensions: {verdict.reason}",
        )
        _audit(req, "rollout.awaiting_person", None, after={"reason": rollout.state_reason})
        return rollout
    return _next_step(rollout, req, after=step, actor=None, reason="analysis passed")


def _next_step(rollout: Rollout, req: DeploymentRequest, *, after: RolloutStep, actor, reason):
    following = rollout.steps.filter(index__gt=after.index).order_by("index").first()
    endpoint = Endpoint.objects.select_for_update().get(pk=req.endpoint_id)
    canary = Deployment.objects.select_for_update().get(request=req)
    stable = stable_of(endpoint)
    now = timezone.now()
    if following is None or following.planned_weight == 100:
        return _promote(rollout, req, endpoint, canary, stable, following, actor, reason)
    traffic_set(
        endpoint=endpoint,
        split=_split(stable, canary, following.planned_weight),
        actor=actor,
        reason=f"canary of request #{req.pk}: step {following.index + 1}, "
        f"{following.planned_weight}% ({reason})",
        rollout_step=following,
    )
    RolloutStep.objects.filter(pk=following.pk).update(started_at=now)
    interval = req.strategy_params["interval_s"]
    rollout.next_check_at = now + timedelta(seconds=interval)
    rollout.save(update_fields=["next_check_at", "updated_at"])
    _notify_advance_on_commit(rollout.pk, countdown=interval)
    return rollout


def _promote(rollout, req, endpoint, canary, stable, last_step, actor, reason) -> Rollout:
    """The canary becomes stable with all traffic; the old stable is retired, its request
    superseded."""
    now = timezone.now()
    _retire_superseded(stable, by=req, actor=actor, now=now)
    canary.role = Deployment.Role.STABLE
    canary.save(update_fields=["role"])
    old = _transition(req, Status.LIVE)
    _audit(
        req,
        "deployment.live",
        actor,
        before={"status": old},
        after={"status": req.status, "artifact_digest": canary.artifact_digest, "why": reason},
    )
    if last_step is not None:
        RolloutStep.objects.filter(pk=last_step.pk).update(started_at=now, ended_at=now)
    traffic_set(
        endpoint=endpoint,
        split={canary.pk: 100},
        actor=actor,
        reason=f"canary of request #{req.pk} promoted ({reason})",
        rollout_step=last_step,
    )
    rollout.next_check_at = None
    rollout.save(update_fields=["next_check_at", "updated_at"])
    _rollout_transition(rollout, Rollout.State.SUCCEEDED, reason=reason)
    _notify(req.pk, "live")
    transaction.on_commit(lambda: _sync_alias_quietly(req.pk))
    transaction.on_commit(lambda: challenger_alias_sync(req.pk))
    return rollout


def _sync_alias_quietly(request_id: int) -> None:
    try:
        _sync_alias(DeploymentRequest.objects.get(pk=request_id))
    except Exception:  # the alias follows at the next registry sync or deployment
        logger.warning("alias of request #%s not moved", request_id, exc_info=True)


def _abort(rollout: Rollout, req: DeploymentRequest, *, reason: str, actor=None) -> Rollout:
    """The canary to 0 % and retired, stable untouched; the request rolled back."""
    endpoint = Endpoint.objects.select_for_update().get(pk=req.endpoint_id)
    canary = Deployment.objects.select_for_update().get(request=req)
    stable = stable_of(endpoint)
    now = timezone.now()
    canary.status, canary.retired_at = Deployment.Status.RETIRED, now
    canary.save(update_fields=["status", "retired_at"])
    traffic_set(
        endpoint=endpoint,
        split={stable.pk: 100},
        actor=actor,
        reason=f"canary of request #{req.pk} aborted: {reason}"[:2000],
    )
    RolloutStep.objects.filter(
        rollout=rollout, started_at__isnull=False, ended_at__isnull=True
    ).update(ended_at=now)
    old = _transition(req, Status.ROLLED_BACK, reason=reason[:2000])
    _audit(
        req,
        "rollout.aborted",
        actor,
        before={"status": old},
        after={"status": req.status, "reason": reason[:2000]},
    )
    rollout.next_check_at = None
    rollout.save(update_fields=["next_check_at", "updated_at"])
    _rollout_transition(rollout, Rollout.State.ABORTED, reason=reason[:2000])
    _notify(req.pk, "rolled_back")
    transaction.on_commit(lambda: challenger_alias_sync(req.pk))
    return rollout


# --- a person's controls ------------------------------------------------------------------------


def _check_controller(actor: User) -> None:
    from django.core.exceptions import PermissionDenied

    if not (can_review(actor) or is_platform_admin(actor)):
        raise PermissionDenied("Only reviewers and platform admins control rollouts.")


@transaction.atomic
def rollout_control(*, rollout_id: int, actor: User, action: str, reason: str = "") -> Rollout:
    """``pause``, ``resume``, ``promote`` (skip the remaining analysis; a reason is required)
    or ``abort`` a rollout, audited.

    Raises: PermissionDenied (not a reviewer or platform admin), ValidationError (unknown
    action, no reason for promote or abort), Conflict (the rollout is finished or the action
    does not fit its state)."""
    from django.core.exceptions import ValidationError

    _check_controller(actor)
    if action not in ("pause", "resume", "promote", "abort"):
        raise ValidationError({"action": "One of pause, resume, promote, abort."})
    if action in ("promote", "abort") and not reason.strip():
        raise ValidationError({"reason": f"Say why the rollout is {action}d."})
    rollout = Rollout.objects.select_for_update().get(pk=rollout_id)
    req = _locked_request(rollout.request_id)
    if not rollout.is_active or req.status != Status.ROLLING_OUT:
        raise Conflict(
            f"The rollout of request #{req.pk} is {rollout.get_state_display().lower()}."
        )
    if action == "pause":
        _rollout_transition(rollout, Rollout.State.PAUSED, reason=reason.strip() or "paused")
    elif action == "resume":
        if rollout.state == Rollout.State.PROGRESSING:
            raise Conflict(f"The rollout of request #{req.pk} is already progressing.")
        _rollout_transition(rollout, Rollout.State.PROGRESSING)
        step = rollout.steps.filter(started_at__isnull=False, ended_at__isnull=True).first()
        if step is None:  # it waited after an inconclusive step: that step starts again
            step = rollout.steps.filter(verdict="inconclusive").order_by("-index").first()
            RolloutStep.objects.filter(pk=step.pk).update(
                started_at=timezone.now(), ended_at=None, verdict="", figures={}
            )
        interval = req.strategy_params["interval_s"]
        rollout.next_check_at = timezone.now() + timedelta(seconds=interval)
        rollout.save(update_fields=["next_check_at", "updated_at"])
        _notify_advance_on_commit(rollout.pk, countdown=interval)
    elif action == "abort":
        who = actor.get_username()
        return _abort(rollout, req, reason=f"aborted by {who}: {reason.strip()}", actor=actor)
    else:
        current = rollout.steps.filter(started_at__isnull=False).order_by("-index").first()
        RolloutStep.objects.filter(
            rollout=rollout, started_at__isnull=False, ended_at__isnull=True
        ).update(ended_at=timezone.now())
        endpoint = Endpoint.objects.select_for_update().get(pk=req.endpoint_id)
        last = rollout.steps.order_by("-index").first()
        if rollout.state != Rollout.State.PROGRESSING:
            _rollout_transition(rollout, Rollout.State.PROGRESSING)
        _promote(
            rollout,
            req,
            endpoint,
            Deployment.objects.select_for_update().get(request=req),
            stable_of(endpoint),
            last if last and last.pk != getattr(current, "pk", None) else None,
            actor,
            f"promoted by {actor.get_username()}: {reason.strip()}",
        )
    _audit(req, f"rollout.{action}", actor, after={"reason": reason.strip()})
    return rollout


def rollouts_due(*, now=None) -> list[int]:
    """Ids of progressing rollouts whose check is due and whose claim is free or lapsed."""
    now = now or timezone.now()
    return list(
        Rollout.objects.filter(state=Rollout.State.PROGRESSING, next_check_at__lte=now)
        .filter(models.Q(lease_until__isnull=True) | models.Q(lease_until__lte=now))
        .values_list("pk", flat=True)
    )

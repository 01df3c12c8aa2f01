"""Alert rules on the rollups: evaluation, the alert lifecycle, actions and e-mail.

A rule watches one endpoint's stable version (``rollouts.services.champion_of``). Every
``ALERT_EVALUATION_S`` seconds Celery beat runs ``monitoring.tasks.evaluate_alerts``, which
calls :func:`alerts_evaluate`:

1. each enabled rule's figure is computed from :class:`Rollup` / :class:`DriftRollup` rows only
   (hours of the evaluation window merged with :func:`monitoring.rollups.merge_rollups`, figures
   from :mod:`monitoring.metrics`), never from the raw prediction log;
2. a figure that crosses the threshold fires an :class:`Alert` unless the rule already has an
   active one (open or acknowledged: one per rule, enforced by a lock on the rule row and a
   partial unique constraint); a defined figure that no longer crosses it resolves the active
   alert; an undefined figure (too few samples, no labels, one class, no offline accuracy,
   insufficient drift data) neither fires nor resolves, since it proves nothing either way;
   an alert on a version that no longer serves is resolved;
3. pending actions run (rollback through ``rollouts.services.deployment_rollback``, or a
   :class:`RetrainingRequest`), each recorded on its alert and audited; a failure (nothing to roll
   back to) is recorded, never raised;
4. alerts not yet e-mailed are sent to the endpoint's team and the managers, after their action,
   so that the message says what was done.

Rollup freshness: the evaluation relies on ``monitoring.tasks.refresh_rollups`` running on its
own beat schedule (``ROLLUP_REFRESH_S``), so the figures lag the log by at most one refresh
interval; evaluating does not refresh, so that the two periodic tasks never hold each other up.

Every step is idempotent: a re-run fires nothing twice, runs no action twice (an action is
claimed by a conditional update from ``pending``), and e-mails each alert once. An action whose
worker died is left ``running`` past its lease (``ALERT_ACTION_LEASE_S``); beat runs
``monitoring.tasks.reclaim_alert_actions``, which runs it again, up to
``ALERT_ACTION_MAX_ATTEMPTS`` attempts, then marks it failed with the reason, and its e-mail goes.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AnonymousUser, User
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.mail import send_mass_mail
from django.db import transaction
from django.db.models import Count, F, Q, QuerySet
from django.utils import timezone

from monitoring import metrics
from monitoring.models import (
    Alert,
    AlertAction,
    AlertKind,
    AlertRule,
    DriftRollup,
    Granularity,
    RetrainingRequest,
    Rollup,
)
from monitoring.rollups import HOUR, floor_hour, merge_rollups, thresholds_for, window_length
from portal.audit import audit_record
from portal.errors import Conflict
from portal.roles import (
    MANAGERS,
    can_request_deployment,
    can_review,
    is_platform_admin,
)
from portal.tasking import enqueue_on_commit
from registry.models import ModelVersion
from rollouts.models import Deployment, Endpoint
from rollouts.selectors import endpoints_visible_to

logger = logging.getLogger(__name__)

ACTIVE = [Alert.Status.OPEN, Alert.Status.ACKNOWLEDGED]

#: Limits on a rule's settings (beyond what the model fields enforce).
MAX_WINDOW_HOURS = 24 * 90
MAX_LABEL_DELAY_HOURS = 24 * 60


# ---------------------------------------------------------------------------------------------
# Who may do what, and what they see


def can_manage_alert_rules(user: User | AnonymousUser) -> bool:
    """Platform admins configure rules, as they configure environments, policies and gates."""
    return is_platform_admin(user)


def can_acknowledge_alerts(user: User | AnonymousUser) -> bool:
    """People who can act on an alert: the model's data scientists (visibility limits them to
    their teams), reviewers and platform admins. Managers read."""
    return can_request_deployment(user) or can_review(user) or is_platform_admin(user)


def alerts_visible_to(user: User | AnonymousUser) -> QuerySet[Alert]:
    """Alerts on the endpoints the user may see (``rollouts.selectors.endpoints_visible_to``)."""
    return Alert.objects.select_related(
        "rule",
        "endpoint__environment",
        "endpoint__registered_model",
        "model_version__registered_model",
        "acknowledged_by",
    ).filter(endpoint__in=endpoints_visible_to(user))


def alert_rules_visible_to(user: User | AnonymousUser) -> QuerySet[AlertRule]:
    return AlertRule.objects.select_related("endpoint__environment").filter(
        endpoint__in=endpoints_visible_to(user)
    )


def open_alert_counts(endpoint_ids: list[int] | set[int]) -> dict[int, int]:
    """``{endpoint_id: number of active (open or acknowledged) alerts}`` for the overview; an
    endpoint without active alerts maps to 0. One query."""
    ids = list(endpoint_ids)
    counts = dict.fromkeys(ids, 0)
    if ids:
        rows = (
            Alert.objects.filter(endpoint_id__in=ids, status__in=ACTIVE)
            .values("endpoint_id")
            .annotate(n=Count("pk"))
        )
        counts.update({row["endpoint_id"]: row["n"] for row in rows})
    return counts


# ---------------------------------------------------------------------------------------------
# Rules


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def endpoint_feature_names(endpoint: Endpoint) -> tuple[list[str], str]:
    """The input column names a drift rule on ``endpoint`` may watch, and where they come from.

    Read from the signatures of the versions live on the endpoint (what drift is computed
    for); with nothing live, from every version of its registered model (a rule may be set up
    before the first release). Returns (sorted names, a phrase naming the source); the list is
    empty when none of those signatures names its columns (tensor or missing signatures).
    """
    live = list(
        ModelVersion.objects.filter(
            deployments__endpoint=endpoint, deployments__status=Deployment.Status.LIVE
        ).distinct()
    )
    if live:
        versions, source = live, "the live version's signature"
        if len(live) > 1:
            source = "the live versions' signatures"
    else:
        versions = list(
            ModelVersion.objects.filter(registered_model_id=endpoint.registered_model_id)
        )
        source = "the model's signatures"
    names = {
        col["name"]
        for version in versions
        for col in version.input_columns
        if isinstance(col, dict) and isinstance(col.get("name"), str)
    }
    return sorted(names), source


def _check_feature(rule: AlertRule, errors: dict[str, str]) -> None:
    """A drift rule on one feature must name an input column of the model (else it could
    never fire, and would look like a safeguard that is not there)."""
    if (
        not rule.feature
        or rule.kind != AlertKind.DRIFT
        or not rule.endpoint_id
        or "feature" in errors
    ):
        return
    names, source = endpoint_feature_names(rule.endpoint)
    if not names:
        errors["feature"] = (
            f"{rule.endpoint} has no signature that names its input columns, so no single "
            "feature can be watched; leave the feature empty to watch the dataset's drift."
        )
    elif rule.feature not in names:
        shown = ", ".join(names[:20]) + (" …" if len(names) > 20 else "")
        errors["feature"] = (
            f"{rule.feature!r} is not an input of {rule.endpoint}: {source} has {shown}."
        )


def alert_rule_validate(rule: AlertRule) -> None:
    """Check a rule's settings as a whole, including (drift on one feature) that the feature is
    an input column of the endpoint's model (:func:`endpoint_feature_names`).

    Raises ValidationError keyed by field."""
    errors: dict[str, str] = {}
    if rule.kind not in AlertKind.values:
        errors["kind"] = f"Unknown kind {rule.kind!r}; one of {', '.join(AlertKind.values)}."
    if rule.action not in AlertAction.values:
        errors["action"] = (
            f"Unknown action {rule.action!r}; one of {', '.join(AlertAction.values)}."
        )
    if rule.granularity not in Granularity.values:
        errors["granularity"] = "Granularity is hour or day."
    if rule.percentile not in (95, 99):
        errors["percentile"] = "Latency rules watch p95 or p99."
    threshold = rule.threshold
    if threshold is not None and not _finite(threshold):
        errors["threshold"] = "The threshold must be a finite number."
    elif rule.kind == AlertKind.DRIFT:
        if threshold is not None and rule.feature and threshold < 0:
            errors["threshold"] = "A PSI threshold is a number >= 0."
        elif threshold is not None and not rule.feature and not 0 < threshold <= 1:
            errors["threshold"] = "A share of drifted features is in (0, 1]."
    elif threshold is None:
        errors["threshold"] = "This kind of rule needs a threshold."
    elif rule.kind in (AlertKind.ERROR_RATE, AlertKind.LABEL_COVERAGE) and not 0 <= threshold <= 1:
        errors["threshold"] = "A rate is a share between 0 and 1 (e.g. 0.05 for 5%)."
    elif rule.kind == AlertKind.ACCURACY_DROP and not 0 <= threshold < 1:
        errors["threshold"] = "The tolerance below the offline accuracy is in [0, 1)."
    elif rule.kind == AlertKind.LATENCY and threshold <= 0:
        errors["threshold"] = "A latency threshold is a positive number of milliseconds."
    if rule.feature and rule.kind != AlertKind.DRIFT:
        errors["feature"] = "Only drift rules watch a single feature."
    _check_feature(rule, errors)
    if not (isinstance(rule.window_hours, int) and 1 <= rule.window_hours <= MAX_WINDOW_HOURS):
        errors["window_hours"] = f"The evaluation window is 1 to {MAX_WINDOW_HOURS} hours."
    if not (isinstance(rule.min_samples, int) and rule.min_samples >= 1):
        errors["min_samples"] = "The minimum sample size is at least 1."
    if not (
        isinstance(rule.label_delay_hours, int)
        and 0 <= rule.label_delay_hours <= MAX_LABEL_DELAY_HOURS
    ):
        errors["label_delay_hours"] = f"The label delay is 0 to {MAX_LABEL_DELAY_HOURS} hours."
    if errors:
        raise ValidationError(errors)


def _check_manager(actor: User | None) -> None:
    if actor is not None and not can_manage_alert_rules(actor):
        raise PermissionDenied("Only platform admins can configure alert rules.")


def _audit_rule(rule: AlertRule, action: str, actor: User | None, **changes: Any) -> None:
    audit_record(
        actor=actor,
        action=action,
        obj=rule,
        registered_model=rule.endpoint.registered_model.name,
        environment=rule.endpoint.environment.name,
        **changes,
    )


@transaction.atomic
def alert_rule_create(*, actor: User | None, endpoint: Endpoint, **fields: Any) -> AlertRule:
    """Create a rule on ``endpoint`` from fields of :attr:`AlertRule.EDITABLE`. ``actor`` None
    is the system (seed commands).

    Raises: PermissionDenied (not a platform admin), ValidationError (bad settings).
    """
    _check_manager(actor)
    unknown = set(fields) - set(AlertRule.EDITABLE)
    if unknown:
        raise ValidationError({"__all__": f"Unknown rule fields: {', '.join(sorted(unknown))}."})
    rule = AlertRule(endpoint=endpoint, created_by=actor, **fields)
    rule.full_clean(exclude=["created_by"])
    alert_rule_validate(rule)
    rule.save()
    _audit_rule(rule, "alert_rule.created", actor, after=rule.as_dict())
    return rule


@transaction.atomic
def alert_rule_update(*, rule_id: int, actor: User | None, changes: dict[str, Any]) -> AlertRule:
    """Change fields of :attr:`AlertRule.EDITABLE`; disabling a rule resolves its active alert.

    Raises: PermissionDenied, ValidationError, AlertRule.DoesNotExist.
    """
    _check_manager(actor)
    unknown = set(changes) - set(AlertRule.EDITABLE)
    if unknown:
        raise ValidationError({"__all__": f"Unknown rule fields: {', '.join(sorted(unknown))}."})
    rule = (
        AlertRule.objects.select_for_update(of=("self",))
        .select_related("endpoint__environment", "endpoint__registered_model")
        .get(pk=rule_id)
    )
    before = rule.as_dict()
    for name, value in changes.items():
        setattr(rule, name, value)
    rule.full_clean(exclude=["created_by"])
    alert_rule_validate(rule)
    changed = [name for name in AlertRule.EDITABLE if before[name] != getattr(rule, name)]
    if not changed:
        return rule
    rule.save(update_fields=[*changed, "updated_at"])
    _audit_rule(
        rule,
        "alert_rule.updated",
        actor,
        before={k: before[k] for k in changed},
        after={k: getattr(rule, k) for k in changed},
    )
    if "enabled" in changed and not rule.enabled:
        _resolve(rule.pk, reason="the rule was disabled", actor=actor)
    return rule


# ---------------------------------------------------------------------------------------------
# Figures


@dataclass
class Evaluation:
    """One rule's figure over its window. ``observed`` None: undefined (``reason`` says why),
    the rule neither fires nor resolves."""

    observed: float | None
    threshold: float | None
    fired: bool
    window_start: datetime
    window_end: datetime
    granularity: str
    message: str = ""
    reason: str = ""
    figures: dict[str, Any] = field(default_factory=dict)

    def evidence(self, rule: AlertRule, version: ModelVersion) -> dict[str, Any]:
        return {
            "rule": rule.as_dict(),
            "version": version.version,
            "window": {
                "start": self.window_start.isoformat(),
                "end": self.window_end.isoformat(),
                "granularity": self.granularity,
            },
            "observed": self.observed,
            "threshold": self.threshold,
            "figures": self.figures,
        }


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _hours_window(rule: AlertRule, now: datetime) -> tuple[datetime, datetime]:
    """[start, end) of the last ``window_hours`` hour windows, the current hour included; for
    label coverage, of the hours that ended at least ``label_delay_hours`` ago."""
    if rule.kind == AlertKind.LABEL_COVERAGE:
        end = floor_hour(now - timedelta(hours=rule.label_delay_hours))
    else:
        end = floor_hour(now) + HOUR
    return end - timedelta(hours=rule.window_hours), end


def _merged(rule: AlertRule, version: ModelVersion, start: datetime, end: datetime) -> dict:
    hours = Rollup.objects.filter(
        endpoint_id=rule.endpoint_id,
        model_version=version,
        granularity=Granularity.HOUR,
        window_start__gte=start,
        window_start__lt=end,
    )
    return merge_rollups(hours)


def evaluate_rule(rule: AlertRule, version: ModelVersion, *, now: datetime) -> Evaluation:
    """The figure of ``rule`` for ``version`` at ``now``, and whether it fires."""
    if rule.kind == AlertKind.DRIFT:
        return _evaluate_drift(rule, version, now)
    start, end = _hours_window(rule, now)
    merged = _merged(rule, version, start, end)
    ev = Evaluation(None, rule.threshold, False, start, end, Granularity.HOUR)
    counts = {k: merged[k] for k in ("requests", "rows", "errors", "labeled")}
    ev.figures = dict(counts)
    where = f"v{version.version} on {rule.endpoint.name}, {rule.window_hours} h"
    threshold = float(rule.threshold) if rule.threshold is not None else math.nan
    if rule.kind == AlertKind.ERROR_RATE:
        total = merged["requests"] + merged["errors"]
        if total < rule.min_samples:
            ev.reason = f"{total} requests, fewer than {rule.min_samples}"
            return ev
        ev.observed = merged["errors"] / total
        ev.figures["error_rate"] = ev.observed
        ev.fired = ev.observed > threshold
        ev.message = (
            f"Error rate {_percent(ev.observed)} of {total} requests is above "
            f"{_percent(threshold)} ({where})"
        )
    elif rule.kind == AlertKind.LATENCY:
        if merged["requests"] < rule.min_samples:
            ev.reason = f"{merged['requests']} requests, fewer than {rule.min_samples}"
            return ev
        value = metrics.latency_percentile(merged["latency_hist"], rule.percentile)
        if value is None:
            ev.reason = "no latency recorded"
            return ev
        ev.observed = value
        ev.figures[f"latency_p{rule.percentile}_ms"] = value
        for q in (50, 95, 99):
            ev.figures.setdefault(
                f"latency_p{q}_ms", metrics.latency_percentile(merged["latency_hist"], q)
            )
        ev.fired = value > threshold
        ev.message = (
            f"p{rule.percentile} latency {value:.1f} ms is above {threshold:g} ms ({where})"
        )
    elif rule.kind == AlertKind.LABEL_COVERAGE:
        if merged["rows"] < rule.min_samples:
            ev.reason = f"{merged['rows']} rows, fewer than {rule.min_samples}"
            return ev
        ev.observed = merged["labeled"] / merged["rows"]
        ev.figures["label_coverage"] = ev.observed
        ev.fired = ev.observed < threshold
        ev.message = (
            f"Label coverage {_percent(ev.observed)} is below {_percent(threshold)} "
            f"({where}, ending {rule.label_delay_hours} h ago)"
        )
    elif rule.kind == AlertKind.ACCURACY_DROP:
        offline = (version.metrics or {}).get("accuracy")
        if not _finite(offline):
            ev.reason = f"v{version.version} has no offline accuracy logged by its training run"
            return ev
        if merged["labeled"] < rule.min_samples:
            ev.reason = f"{merged['labeled']} labeled rows, fewer than {rule.min_samples}"
            return ev
        if merged["task"] == "regression":
            ev.reason = "accuracy is undefined for a regressor"
            return ev
        quality = metrics.classification_quality(metrics.Confusion(merged["confusion"]))
        if quality.accuracy is None:
            ev.reason = quality.undefined.get("accuracy", "accuracy is undefined")
            return ev
        ev.observed = quality.accuracy
        ev.threshold = float(offline) - threshold
        ev.figures.update(
            accuracy=quality.accuracy,
            offline_accuracy=float(offline),
            tolerance=threshold,
            label_coverage=merged["labeled"] / merged["rows"] if merged["rows"] else None,
        )
        ev.fired = ev.observed < ev.threshold
        ev.message = (
            f"Accuracy {_percent(ev.observed)} on {merged['labeled']} labeled rows is below "
            f"the offline {_percent(float(offline))} minus {_percent(threshold)} ({where})"
        )
    else:  # pragma: no cover - kinds are validated
        ev.reason = f"unknown kind {rule.kind!r}"
    return ev


def _evaluate_drift(rule: AlertRule, version: ModelVersion, now: datetime) -> Evaluation:
    """The latest drift window of ``rule.granularity`` in the last ``window_hours`` hours that
    has at least ``min_samples`` rows."""
    since = now - timedelta(hours=rule.window_hours) - window_length(rule.granularity)
    latest = (
        DriftRollup.objects.filter(
            endpoint_id=rule.endpoint_id,
            model_version=version,
            granularity=rule.granularity,
            window_start__gt=since,
            rows__gte=rule.min_samples,
        )
        .order_by("-window_start")
        .first()
    )
    if latest is None:
        start = floor_hour(now) + HOUR - timedelta(hours=rule.window_hours)
        ev = Evaluation(
            None, rule.threshold, False, start, floor_hour(now) + HOUR, rule.granularity
        )
        ev.reason = f"no {rule.granularity} drift window with {rule.min_samples}+ rows"
        return ev
    end = latest.window_start + window_length(rule.granularity)
    ev = Evaluation(None, rule.threshold, False, latest.window_start, end, rule.granularity)
    result = latest.result or {}
    ev.figures = {"rows": latest.rows, "reference": latest.reference}
    where = f"v{version.version} on {rule.endpoint.name}, {rule.granularity} of {latest.window_start:%Y-%m-%d %H:00}"
    if not rule.feature:
        share = latest.share_drifted
        if latest.drifted is None or share is None:
            ev.reason = result.get("reason") or "insufficient drift data"
            return ev
        ev.figures.update(
            share_drifted=share,
            drifted=latest.drifted,
            drifted_features=[
                f.get("name") for f in result.get("features", []) if f.get("status") == "drift"
            ],
        )
        ev.observed = float(share)
        if rule.threshold is None:
            ev.threshold = _number_or(result.get("drift_share"), share)
            ev.fired = bool(latest.drifted)
        else:
            ev.fired = share >= rule.threshold
        ev.message = (
            f"Dataset drift: {_percent(share)} of features drifted "
            f"(limit {_percent(ev.threshold)}; {where})"
        )
        return ev
    candidates = list(result.get("features") or [])
    if result.get("prediction"):
        candidates.append(result["prediction"])
    feature = next((f for f in candidates if f.get("name") == rule.feature), None)
    if feature is None:
        ev.reason = f"no drift figures for feature {rule.feature!r}"
        return ev
    ev.figures["feature"] = feature
    if feature.get("status") == "insufficient data" or not _finite(feature.get("psi")):
        ev.reason = feature.get("reason") or f"insufficient data for {rule.feature!r}"
        return ev
    psi = float(feature["psi"])
    ev.observed = psi
    if rule.threshold is None:
        base, per_feature, _ = thresholds_for(rule.endpoint_id)
        ev.threshold = per_feature.get(rule.feature, base).psi_drift
        ev.fired = feature.get("status") == "drift"
        ev.message = f"Feature {rule.feature!r} drifted: PSI {psi:.3f} ({where})"
    else:
        ev.fired = psi >= rule.threshold
        ev.message = (
            f"Feature {rule.feature!r} PSI {psi:.3f} is at or above {rule.threshold:g} ({where})"
        )
    return ev


def _number_or(value: Any, default: float) -> float:
    return float(value) if _finite(value) else float(default)


# ---------------------------------------------------------------------------------------------
# Lifecycle


def _audit_alert(alert: Alert, action: str, actor: User | None, **changes: Any) -> None:
    audit_record(
        actor=actor,
        action=action,
        obj=alert,
        registered_model=alert.endpoint.registered_model.name,
        environment=alert.endpoint.environment.name,
        **changes,
    )


@transaction.atomic
def _fire(rule_id: int, version: ModelVersion, ev: Evaluation, now: datetime) -> Alert | None:
    """Open an alert for the rule unless it has an active one (the rule row is locked, so two
    evaluations queue here); returns the new alert or None."""
    rule = (
        AlertRule.objects.select_for_update(of=("self",))
        .select_related("endpoint__environment", "endpoint__registered_model")
        .get(pk=rule_id)
    )
    if not rule.enabled or Alert.objects.filter(rule=rule, status__in=ACTIVE).exists():
        return None
    alert = Alert.objects.create(
        rule=rule,
        endpoint=rule.endpoint,
        model_version=version,
        window_start=ev.window_start,
        window_end=ev.window_end,
        observed=ev.observed,
        threshold=ev.threshold,
        message=ev.message[:500],
        evidence=ev.evidence(rule, version),
        fired_at=now,
        action=rule.action,
        action_status=(
            Alert.ActionStatus.NONE
            if rule.action == AlertAction.NOTIFY
            else Alert.ActionStatus.PENDING
        ),
    )
    _audit_alert(
        alert,
        "alert.fired",
        None,
        after={
            "rule": rule.pk,
            "version": version.version,
            "observed": ev.observed,
            "threshold": ev.threshold,
            "message": alert.message,
            "action": rule.action,
        },
    )
    return alert


@transaction.atomic
def _resolve(rule_id: int, *, reason: str, actor: User | None = None) -> Alert | None:
    alert = (
        Alert.objects.select_for_update(of=("self",))
        .select_related("endpoint__environment", "endpoint__registered_model")
        .filter(rule_id=rule_id, status__in=ACTIVE)
        .first()
    )
    if alert is None:
        return None
    old = alert.status
    alert.status, alert.resolved_at, alert.resolution = (
        Alert.Status.RESOLVED,
        timezone.now(),
        reason[:255],
    )
    alert.save(update_fields=["status", "resolved_at", "resolution"])
    _audit_alert(
        alert,
        "alert.resolved",
        actor,
        before={"status": old},
        after={"status": alert.status, "reason": alert.resolution},
    )
    return alert


@transaction.atomic
def alert_acknowledge(*, alert_id: int, actor: User) -> Alert:
    """A person takes an open alert: it stays active (no duplicate fires) until it resolves.

    Raises: Alert.DoesNotExist (missing or not visible to ``actor``), PermissionDenied (a
    persona who may only read alerts), Conflict (already acknowledged or resolved).
    """
    alert = alerts_visible_to(actor).select_for_update(of=("self",)).get(pk=alert_id)
    if not can_acknowledge_alerts(actor):
        raise PermissionDenied(
            "Only data scientists, reviewers and platform admins acknowledge alerts."
        )
    if alert.status != Alert.Status.OPEN:
        who = alert.acknowledged_by.get_username() if alert.acknowledged_by else ""
        detail = (
            f"acknowledged by {who}" if alert.status == Alert.Status.ACKNOWLEDGED else "resolved"
        )
        raise Conflict(f"Alert #{alert.pk} is already {detail}.")
    alert.status = Alert.Status.ACKNOWLEDGED
    alert.acknowledged_by, alert.acknowledged_at = actor, timezone.now()
    alert.save(update_fields=["status", "acknowledged_by", "acknowledged_at"])
    _audit_alert(
        alert,
        "alert.acknowledged",
        actor,
        before={"status": Alert.Status.OPEN},
        after={"status": alert.status},
    )
    return alert


# ---------------------------------------------------------------------------------------------
# Actions


def _action_lease() -> timedelta:
    return timedelta(seconds=settings.ALERT_ACTION_LEASE_S)


def alert_run_action(*, alert_id: int) -> Alert:
    """Run the pending action of an alert once, record its outcome on the alert and audit it.
    Failures are recorded, never raised.

    The action is claimed by a conditional update from ``pending`` to ``running`` that counts
    the attempt and sets a lease (``ALERT_ACTION_LEASE_S``); a worker that dies while running
    it leaves the alert ``running`` past its lease, and :func:`alert_actions_reclaim` (beat)
    puts it back to pending. The outcome is written only while this attempt still holds the
    claim, so a run that outlived its lease and was reclaimed cannot overwrite the newer one.
    """
    now = timezone.now()
    claimed = Alert.objects.filter(pk=alert_id, action_status=Alert.ActionStatus.PENDING).update(
        action_status=Alert.ActionStatus.RUNNING,
        action_attempts=F("action_attempts") + 1,
        action_lease_until=now + _action_lease(),
    )
    alert = Alert.objects.select_related(
        "rule", "endpoint__environment", "endpoint__registered_model", "model_version"
    ).get(pk=alert_id)
    if not claimed:
        return alert
    attempt = alert.action_attempts
    if alert.action == AlertAction.ROLLBACK:
        status, result = _rollback(alert)
    elif alert.action == AlertAction.RETRAINING_REQUEST:
        status, result = _open_retraining_request(alert)
    else:
        status, result = Alert.ActionStatus.NONE, ""
    with transaction.atomic():
        written = Alert.objects.filter(
            pk=alert.pk, action_status=Alert.ActionStatus.RUNNING, action_attempts=attempt
        ).update(action_status=status, action_result=result, action_lease_until=None)
        if not written:
            logger.warning(
                "alert #%s: attempt %s of its action outlived its lease and was reclaimed; "
                "its outcome (%s: %s) is not recorded",
                alert.pk,
                attempt,
                status,
                result,
            )
            alert.refresh_from_db()
            return alert
        alert.action_status, alert.action_result = status, result
        _audit_alert(
            alert,
            "alert.action",
            None,
            after={
                "action": alert.action,
                "status": status,
                "result": result,
                "attempt": attempt,
            },
        )
    return alert


def _lapsed_action(now: datetime) -> Q:
    return Q(action_status=Alert.ActionStatus.RUNNING) & (
        Q(action_lease_until__lte=now) | Q(action_lease_until__isnull=True)
    )


def alert_actions_reclaim(*, now: datetime | None = None) -> list[int]:
    """Reclaim the actions left ``running`` past their lease (their worker died): each runs
    again, or, when it has been attempted ``ALERT_ACTION_MAX_ATTEMPTS`` times, is marked failed
    with the reason. Either way the alert's e-mail is then queued (it waits for the action, so
    that the message says what was done). Safe to run concurrently with itself and with
    :func:`alerts_evaluate`: every step is a conditional update checked by its row count.

    Returns the ids of the alerts reclaimed or given up.
    """
    now = now or timezone.now()
    done: list[int] = []
    for pk, attempts in Alert.objects.filter(_lapsed_action(now)).values_list(
        "pk", "action_attempts"
    ):
        give_up = attempts >= settings.ALERT_ACTION_MAX_ATTEMPTS
        reason = (
            f"Not run: its worker stopped before finishing {attempts} times; gave up after "
            f"{settings.ALERT_ACTION_MAX_ATTEMPTS} attempts (ALERT_ACTION_MAX_ATTEMPTS)."
        )
        with transaction.atomic():
            changes: dict[str, Any] = (
                {"action_status": Alert.ActionStatus.FAILED, "action_result": reason}
                if give_up
                else {"action_status": Alert.ActionStatus.PENDING}
            )
            if not Alert.objects.filter(
                _lapsed_action(now), pk=pk, action_attempts=attempts
            ).update(action_lease_until=None, **changes):
                continue  # finished, or reclaimed by another worker, meanwhile
            alert = Alert.objects.select_related(
                "endpoint__environment", "endpoint__registered_model"
            ).get(pk=pk)
            _audit_alert(
                alert,
                "alert.action" if give_up else "alert.action_reclaimed",
                None,
                before={"status": Alert.ActionStatus.RUNNING, "attempts": attempts},
                after=(
                    {"action": alert.action, "status": alert.action_status, "result": reason}
                    if give_up
                    else {"status": alert.action_status}
                ),
            )
        if give_up:
            logger.error("alert #%s: %s", pk, reason)
        else:
            logger.warning(
                "alert #%s: action abandoned after attempt %s; running it again", pk, attempts
            )
            alert_run_action(alert_id=pk)
        done.append(pk)
    _queue_notifications(
        list(
            Alert.objects.filter(pk__in=done, notified_at__isnull=True, status__in=ACTIVE)
            .exclude(action_status__in=[Alert.ActionStatus.PENDING, Alert.ActionStatus.RUNNING])
            .values_list("pk", flat=True)
        )
    )
    return done


def _rollback(alert: Alert) -> tuple[str, str]:
    from registry.mlflow_client import RegistryError
    from rollouts import services as rollout_services
    from rollouts.models import Deployment, DeploymentRequest

    reason = f"alert #{alert.pk}: {alert.message}"
    # A re-run (the worker of an earlier attempt died) or a person may have rolled back
    # already: rolling back whatever is live now would go one release further back.
    if not Deployment.objects.filter(
        endpoint_id=alert.endpoint_id,
        model_version_id=alert.model_version_id,
        status=Deployment.Status.LIVE,
    ).exists():
        done = DeploymentRequest.objects.filter(
            endpoint_id=alert.endpoint_id,
            model_version_id=alert.model_version_id,
            status=DeploymentRequest.Status.ROLLED_BACK,
            status_reason__startswith=f"alert #{alert.pk}:",
        ).exists()
        version = f"v{alert.model_version.version}"
        if done:
            return Alert.ActionStatus.SUCCEEDED, f"Rolled back {version} (by an earlier attempt)."
        return (
            Alert.ActionStatus.FAILED,
            f"Not rolled back: {version} no longer serves on {alert.endpoint.name}.",
        )
    try:
        restored = rollout_services.deployment_rollback(
            endpoint_id=alert.endpoint_id, actor=None, reason=reason
        )
    except (Conflict, ValidationError, PermissionDenied) as exc:
        return Alert.ActionStatus.FAILED, f"Not rolled back: {' '.join(_messages(exc))}"
    except RegistryError as exc:
        # Raised only after traffic moved (the alias follows outside the transaction).
        return (
            Alert.ActionStatus.SUCCEEDED,
            f"Rolled back, but moving the MLflow alias failed: {exc}",
        )
    except Exception as exc:  # noqa: BLE001 - one rule's failure must not stop the others
        logger.exception("rollback for alert #%s failed", alert.pk)
        return Alert.ActionStatus.FAILED, f"Rollback failed: {type(exc).__name__}: {exc}"
    return (
        Alert.ActionStatus.SUCCEEDED,
        f"Rolled back to v{restored.model_version.version} (request #{restored.pk}).",
    )


def _messages(exc: Exception) -> list[str]:
    return exc.messages if isinstance(exc, ValidationError) else [str(exc)]


@transaction.atomic
def _open_retraining_request(alert: Alert) -> tuple[str, str]:
    existing = RetrainingRequest.objects.filter(
        endpoint_id=alert.endpoint_id,
        model_version_id=alert.model_version_id,
        status=RetrainingRequest.Status.OPEN,
    ).first()
    if existing is not None:
        return (
            Alert.ActionStatus.SUCCEEDED,
            f"Retraining request #{existing.pk} is already open for this version.",
        )
    retraining = retraining_request_open(
        endpoint=alert.endpoint,
        model_version=alert.model_version,
        reason=alert.message,
        evidence={**alert.evidence, "alert": alert.pk},
        alert=alert,
        actor=None,
    )
    return Alert.ActionStatus.SUCCEEDED, f"Opened retraining request #{retraining.pk}."


@transaction.atomic
def retraining_request_open(
    *,
    endpoint: Endpoint,
    model_version: ModelVersion,
    reason: str,
    evidence: dict[str, Any],
    actor: User | None,
    alert: Alert | None = None,
) -> RetrainingRequest:
    """Open a retraining request; ``actor`` None is the system (an alert rule).

    Raises ValidationError without a reason."""
    if not reason.strip():
        raise ValidationError({"reason": "Say why the version should be retrained."})
    retraining = RetrainingRequest.objects.create(
        endpoint=endpoint,
        model_version=model_version,
        alert=alert,
        reason=reason.strip(),
        evidence=evidence,
        created_by=actor,
    )
    audit_record(
        actor=actor,
        action="retraining_request.opened",
        obj=retraining,
        registered_model=endpoint.registered_model.name,
        environment=endpoint.environment.name,
        after={
            "version": model_version.version,
            "reason": retraining.reason,
            "alert": alert and alert.pk,
        },
    )
    return retraining


@transaction.atomic
def retraining_request_close(*, request_id: int, actor: User | None) -> RetrainingRequest:
    """Raises PermissionDenied (a person who cannot act on alerts), Conflict (already closed)."""
    if actor is not None and not can_acknowledge_alerts(actor):
        raise PermissionDenied("Only data scientists, reviewers and platform admins close these.")
    retraining = (
        RetrainingRequest.objects.select_for_update(of=("self",))
        .select_related("endpoint__environment", "endpoint__registered_model")
        .get(pk=request_id)
    )
    if retraining.status != RetrainingRequest.Status.OPEN:
        raise Conflict(f"Retraining request #{retraining.pk} is already closed.")
    retraining.status, retraining.closed_at = RetrainingRequest.Status.CLOSED, timezone.now()
    retraining.save(update_fields=["status", "closed_at"])
    audit_record(
        actor=actor,
        action="retraining_request.closed",
        obj=retraining,
        registered_model=retraining.endpoint.registered_model.name,
        environment=retraining.endpoint.environment.name,
        before={"status": RetrainingRequest.Status.OPEN},
        after={"status": retraining.status},
    )
    return retraining


# ---------------------------------------------------------------------------------------------
# E-mail


def alert_recipients(endpoint: Endpoint) -> list[str]:
    """The active members (with an address) of the team that owns the endpoint's model, and
    the managers."""
    team = (
        Q(teams__pk=endpoint.registered_model.team_id)
        if endpoint.registered_model.team_id
        else Q(pk__in=[])
    )
    return sorted(
        set(
            User.objects.filter(team | Q(groups__name=MANAGERS), is_active=True)
            .exclude(email="")
            .values_list("email", flat=True)
        )
    )


def alert_notify(*, alert_id: int) -> int:
    """E-mail an alert once; one message per recipient, as ``rollouts.notifications`` does.
    Returns the number of messages sent (0 when it was sent already or another worker is
    sending it).

    The alert is marked ``notified_at`` only after the mail backend accepted the messages
    (issue 9): marking it first would lose the e-mail for good when the worker died mid-send.
    Two workers never send it at once: the send holds a lease on the alert
    (:mod:`portal.leases`), which lapses if its worker dies; an unsent alert is queued again by
    the next evaluation (:func:`alerts_evaluate`). Delivery is at least once: a worker dying
    between the send and the mark sends it again.

    Raises what the mail backend raises (``notified_at`` stays empty)."""
    from portal import leases

    name = f"alert-notify:{alert_id}"
    holder = leases.new_holder()
    if not leases.lease_acquire(name=name, holder=holder, ttl=timedelta(minutes=5)):
        return 0
    try:
        return _alert_send(alert_id)
    finally:
        leases.lease_release(name=name, holder=holder)


def _alert_send(alert_id: int) -> int:
    alert = (
        Alert.objects.select_related(
            "rule", "endpoint__registered_model", "endpoint__environment", "model_version"
        )
        .filter(pk=alert_id, notified_at__isnull=True)
        .first()
    )
    if alert is None:
        return 0
    recipients = alert_recipients(alert.endpoint)
    link = f"{settings.SITE_URL.rstrip('/')}{alert.get_absolute_url()}"
    subject = (
        f"[Rollgate] Alert: {alert.rule.label} on {alert.endpoint.name} "
        f"(v{alert.model_version.version})"
    )
    action = ""
    if alert.action != AlertAction.NOTIFY:
        action = f"\nAction ({alert.get_action_display()}): {alert.action_result or alert.get_action_status_display()}\n"
    body = (
        f"{alert.message}.\n\nWindow: {alert.window_start:%Y-%m-%d %H:%M} to "
        f"{alert.window_end:%Y-%m-%d %H:%M} UTC\n{action}\nAcknowledge it at {link}\n"
    )
    messages = [(subject, body, settings.DEFAULT_FROM_EMAIL, [address]) for address in recipients]
    sent = send_mass_mail(messages, fail_silently=False) if messages else 0
    Alert.objects.filter(pk=alert_id, notified_at__isnull=True).update(notified_at=timezone.now())
    return sent


# ---------------------------------------------------------------------------------------------
# The periodic evaluation


@dataclass
class EvaluationResult:
    evaluated: int = 0
    fired: list[int] = field(default_factory=list)
    resolved: list[int] = field(default_factory=list)
    undefined: int = 0
    actions: int = 0
    notifications: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "evaluated": self.evaluated,
            "fired": len(self.fired),
            "resolved": len(self.resolved),
            "undefined": self.undefined,
            "actions": self.actions,
            "notifications": len(self.notifications),
        }


def alerts_evaluate(*, now: datetime | None = None) -> EvaluationResult:
    """Evaluate every enabled rule, run pending actions and queue pending e-mails (see the
    module docstring). Idempotent."""
    from rollouts.services import champion_of

    now = now or timezone.now()
    result = EvaluationResult()
    rules = AlertRule.objects.filter(enabled=True).select_related(
        "endpoint__environment", "endpoint__registered_model"
    )
    active = {
        a.rule_id: a
        for a in Alert.objects.filter(status__in=ACTIVE, rule__enabled=True).select_related(
            "model_version"
        )
    }
    for rule in rules:
        version = champion_of(rule.endpoint)
        current = active.get(rule.pk)
        if current is not None and (version is None or current.model_version_id != version.pk):
            gone = f"v{current.model_version.version} no longer serves on {rule.endpoint.name}"
            if _resolve(rule.pk, reason=gone):
                result.resolved.append(current.pk)
            current = None
        if version is None:
            continue
        result.evaluated += 1
        try:
            ev = evaluate_rule(rule, version, now=now)
        except Exception:  # noqa: BLE001 - one broken rule must not silence the others
            logger.exception("alert rule #%s could not be evaluated", rule.pk)
            continue
        if ev.observed is None:
            result.undefined += 1
        elif ev.fired:
            alert = _fire(rule.pk, version, ev, now)
            if alert is not None:
                result.fired.append(alert.pk)
        elif current is not None:
            resolved = _resolve(rule.pk, reason=f"back within the threshold: {_summary(ev)}")
            if resolved is not None:
                result.resolved.append(resolved.pk)
    for alert_id in Alert.objects.filter(action_status=Alert.ActionStatus.PENDING).values_list(
        "pk", flat=True
    ):
        alert_run_action(alert_id=alert_id)
        result.actions += 1
    result.notifications = list(
        Alert.objects.filter(notified_at__isnull=True, status__in=ACTIVE)
        .exclude(action_status__in=[Alert.ActionStatus.PENDING, Alert.ActionStatus.RUNNING])
        .values_list("pk", flat=True)
    )
    _queue_notifications(result.notifications)
    return result


def _summary(ev: Evaluation) -> str:
    value = f"{ev.observed:.4g}" if ev.observed is not None else "undefined"
    limit = f"{ev.threshold:.4g}" if ev.threshold is not None else "none"
    return f"observed {value}, threshold {limit}"


def _queue_notifications(alert_ids: list[int]) -> None:
    """Queue each alert's e-mail once the transaction commits. A broker that cannot be reached
    is logged, not raised (:mod:`portal.tasking`): ``notified_at`` stays empty, so the next
    evaluation queues it again (the task claims the alert, so a second queued copy sends
    nothing)."""
    from monitoring import tasks

    for alert_id in alert_ids:
        enqueue_on_commit(tasks.send_alert_notification, alert_id)

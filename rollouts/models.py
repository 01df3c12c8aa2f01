"""Environments, endpoints, deployment requests and their reviews, deployments, API keys, and the
prediction log that the serving data plane writes."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.conf import settings
from django.contrib.auth.models import Group
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.urls import reverse

from registry.models import ModelVersion, RegisteredModel


def default_gates() -> list[str]:
    from rollouts.gates import ALL_GATES

    return list(ALL_GATES)


def default_strategies() -> list[str]:
    return ["direct", "canary"]


class Environment(models.Model):
    """A stage a model version is released to, e.g. ``staging`` or ``production``.

    The environment's name is also the MLflow alias that follows its live version.
    """

    name = models.SlugField(max_length=64, unique=True)
    description = models.CharField(max_length=255, blank=True)
    order = models.PositiveSmallIntegerField(default=0, help_text="position on the promotion path")
    # --- approval policy (edited by platform admins; every edit is audited) ---
    required_approvals = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(10)],
        help_text="distinct people from the approver group who must approve",
    )
    approver_group = models.ForeignKey(
        Group,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="who may approve; empty means the reviewers group",
    )
    requires_live_in = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
        help_text="promotion path: the same version must have been live there first",
    )
    gates = models.JSONField(
        default=default_gates, blank=True, help_text="names of the gates to run"
    )
    metric_tolerance = models.FloatField(
        default=0.0,
        validators=[MinValueValidator(0.0), MaxValueValidator(1.0)],
        help_text="largest drop of a gated offline metric below the champion's that passes",
    )
    request_expiry_days = models.PositiveSmallIntegerField(
        default=7, validators=[MinValueValidator(1)], help_text="undecided requests expire after"
    )
    allowed_strategies = models.JSONField(
        default=default_strategies,
        blank=True,
        help_text='the rollout strategies requests may use, e.g. ["direct", "canary"]',
    )
    rollout_defaults = models.JSONField(
        default=dict,
        blank=True,
        help_text='default parameters per strategy, e.g. {"canary": {"interval_s": 300}}',
    )
    analysis_policy = models.JSONField(
        default=dict,
        blank=True,
        help_text='canary analysis thresholds (AnalysisPolicy), e.g. {"alpha": 0.05}',
    )

    class Meta:
        ordering = ["order", "name"]

    def __str__(self) -> str:
        return self.name

    def active_freeze(self, at: datetime) -> FreezeWindow | None:
        return self.freeze_windows.filter(starts_at__lte=at, ends_at__gt=at).first()

    POLICY_FIELDS = (
        "required_approvals",
        "approver_group",
        "requires_live_in",
        "gates",
        "metric_tolerance",
        "request_expiry_days",
        "allowed_strategies",
        "rollout_defaults",
        "analysis_policy",
    )

    def policy(self) -> dict[str, object]:
        """The approval policy as plain data (for audit events and the API)."""
        return {
            "required_approvals": self.required_approvals,
            "approver_group": self.approver_group.name if self.approver_group_id else None,
            "requires_live_in": self.requires_live_in.name if self.requires_live_in_id else None,
            "gates": list(self.gates),
            "metric_tolerance": self.metric_tolerance,
            "request_expiry_days": self.request_expiry_days,
            "allowed_strategies": list(self.allowed_strategies),
            "rollout_defaults": dict(self.rollout_defaults),
            "analysis_policy": dict(self.analysis_policy),
        }


class FreezeWindow(models.Model):
    """No release to the environment between ``starts_at`` and ``ends_at`` unless a platform
    admin overrides it on a request, with a reason."""

    environment = models.ForeignKey(
        Environment, on_delete=models.CASCADE, related_name="freeze_windows"
    )
    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    reason = models.CharField(max_length=255)

    class Meta:
        ordering = ["starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(ends_at__gt=models.F("starts_at")),
                name="freeze_ends_after_start",
            )
        ]

    def __str__(self) -> str:
        return f"{self.environment} frozen {self.starts_at:%Y-%m-%d %H:%M} to {self.ends_at:%Y-%m-%d %H:%M}"


class Endpoint(models.Model):
    """A named real-time serving endpoint of one registered model in one environment."""

    name = models.SlugField(max_length=100, unique=True)
    environment = models.ForeignKey(Environment, on_delete=models.PROTECT, related_name="endpoints")
    registered_model = models.ForeignKey(
        RegisteredModel, on_delete=models.PROTECT, related_name="endpoints"
    )
    max_body_bytes = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="largest scoring request body; empty: SERVING_MAX_BODY_BYTES",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["registered_model", "environment"], name="one_endpoint_per_model_and_env"
            )
        ]

    def __str__(self) -> str:
        return self.name

    def get_absolute_url(self) -> str:
        return reverse("monitoring:endpoint", args=[self.name])


class Strategy(models.TextChoices):
    DIRECT = "direct", "Direct (all traffic at once)"
    CANARY = "canary", "Canary (growing shares of traffic, each judged against stable)"


class DeploymentRequest(models.Model):
    """A data scientist's request to take one model version to one endpoint."""

    class Status(models.TextChoices):
        PENDING_GATES = "pending_gates", "Pending gates"
        AWAITING_REVIEW = "awaiting_review", "Awaiting review"
        APPROVED = "approved", "Approved"
        DEPLOYING = "deploying", "Deploying"
        LIVE = "live", "Live"
        GATES_FAILED = "gates_failed", "Gates failed"
        REJECTED = "rejected", "Rejected"
        CANCELLED = "cancelled", "Cancelled"
        EXPIRED = "expired", "Expired"
        FAILED = "failed", "Failed"
        ROLLED_BACK = "rolled_back", "Rolled back"
        SUPERSEDED = "superseded", "Superseded"
        ROLLING_OUT = "rolling_out", "Rolling out"

    # The only allowed moves; ``rollouts.services`` raises InvalidTransition for any other.
    TRANSITIONS: dict[str, frozenset[str]] = {
        Status.PENDING_GATES: frozenset(
            {Status.AWAITING_REVIEW, Status.GATES_FAILED, Status.CANCELLED, Status.EXPIRED}
        ),
        Status.AWAITING_REVIEW: frozenset(
            {Status.APPROVED, Status.REJECTED, Status.CANCELLED, Status.EXPIRED}
        ),
        Status.APPROVED: frozenset({Status.DEPLOYING, Status.CANCELLED}),
        # Cancelling a deploy stuck in deploying (its worker died) frees the version at once;
        # a deploy task still running then finds the request cancelled and promotes nothing.
        Status.DEPLOYING: frozenset(
            {Status.LIVE, Status.ROLLING_OUT, Status.FAILED, Status.CANCELLED}
        ),
        # A canary serves its share of traffic until it is promoted or rolled back.
        Status.ROLLING_OUT: frozenset({Status.LIVE, Status.ROLLED_BACK}),
        Status.LIVE: frozenset({Status.SUPERSEDED, Status.ROLLED_BACK}),
        # A rollback restores the release that the rolled-back one had superseded.
        Status.SUPERSEDED: frozenset({Status.LIVE}),
        Status.GATES_FAILED: frozenset(),
        Status.REJECTED: frozenset(),
        Status.CANCELLED: frozenset(),
        Status.EXPIRED: frozenset(),
        Status.FAILED: frozenset(),
        Status.ROLLED_BACK: frozenset(),
    }
    # Not yet decided or deployed: counts as "open" for duplicates and expiry.
    ACTIVE = frozenset(
        {
            Status.PENDING_GATES,
            Status.AWAITING_REVIEW,
            Status.APPROVED,
            Status.DEPLOYING,
            Status.ROLLING_OUT,
        }
    )
    UNDECIDED = frozenset({Status.PENDING_GATES, Status.AWAITING_REVIEW})
    TERMINAL = frozenset(
        {
            Status.GATES_FAILED,
            Status.REJECTED,
            Status.CANCELLED,
            Status.EXPIRED,
            Status.FAILED,
            Status.ROLLED_BACK,
            Status.SUPERSEDED,
        }
    )
    RESUBMITTABLE = frozenset(
        {Status.GATES_FAILED, Status.REJECTED, Status.CANCELLED, Status.EXPIRED, Status.FAILED}
    )

    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="deployment_requests"
    )
    endpoint = models.ForeignKey(
        Endpoint, on_delete=models.PROTECT, related_name="deployment_requests"
    )
    strategy = models.CharField(max_length=32, choices=Strategy.choices, default=Strategy.DIRECT)
    strategy_params = models.JSONField(
        default=dict, blank=True, help_text="the strategy's parameters, checked and completed"
    )
    justification = models.TextField()
    requester = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="deployment_requests"
    )
    status = models.CharField(
        max_length=32, choices=Status.choices, default=Status.PENDING_GATES, db_index=True
    )
    status_reason = models.TextField(blank=True)
    previous_request = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="resubmissions",
        help_text="the request this one asks again after it was rejected",
    )
    artifact_digest = models.CharField(
        max_length=64, blank=True, help_text="sha256 of the artifacts the gates checked"
    )
    freeze_override_reason = models.TextField(blank=True)
    freeze_override_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    decided_at = models.DateTimeField(null=True, blank=True)
    live_at = models.DateTimeField(null=True, blank=True)
    # The deploy task's claim while ``deploying``: a worker that dies lets it lapse, and beat
    # (``redispatch_stalled``) queues the deploy again; see ``services.deployment_execute``.
    deploy_attempts = models.PositiveSmallIntegerField(
        default=0, help_text="deploy tasks that claimed this request"
    )
    deploy_lease_until = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="the claiming deploy task's lease expiry"
    )

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"request #{self.pk}: {self.model_version} to {self.endpoint}"

    def get_absolute_url(self) -> str:
        return reverse("rollouts:request", args=[self.pk])

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE


class Review(models.Model):
    class Decision(models.TextChoices):
        APPROVE = "approve", "Approve"
        REJECT = "reject", "Reject"

    request = models.ForeignKey(DeploymentRequest, on_delete=models.CASCADE, related_name="reviews")
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="reviews"
    )
    decision = models.CharField(max_length=16, choices=Decision.choices)
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.UniqueConstraint(fields=["request", "reviewer"], name="one_review_per_person")
        ]

    def __str__(self) -> str:
        return f"{self.reviewer} {self.decision}d request #{self.request_id}"


class GateResult(models.Model):
    """Evidence from one automated gate, bound to the artifact digest it checked."""

    request = models.ForeignKey(
        DeploymentRequest, on_delete=models.CASCADE, related_name="gate_results"
    )
    name = models.CharField(max_length=64)
    passed = models.BooleanField()
    summary = models.CharField(max_length=1000)
    details = models.JSONField(default=dict, blank=True)
    artifact_digest = models.CharField(max_length=64)
    seconds = models.FloatField(default=0.0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["pk"]
        constraints = [
            models.UniqueConstraint(fields=["request", "name"], name="one_result_per_gate")
        ]

    def __str__(self) -> str:
        return f"{self.name} {'passed' if self.passed else 'failed'} on request #{self.request_id}"

    @property
    def label(self) -> str:
        from rollouts.gates import GATE_LABELS

        return GATE_LABELS.get(self.name, self.name)


class Comment(models.Model):
    request = models.ForeignKey(
        DeploymentRequest, on_delete=models.CASCADE, related_name="comments"
    )
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="+")
    body = models.TextField(max_length=4000)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at"]

    def __str__(self) -> str:
        return f"comment by {self.author} on request #{self.request_id}"


class Deployment(models.Model):
    """One model version placed on one endpoint, pinned by version number and artifact digest."""

    class Status(models.TextChoices):
        LAUNCHING = "launching", "Launching"
        LIVE = "live", "Live"
        FAILED = "failed", "Failed"
        RETIRED = "retired", "Retired"

    class Role(models.TextChoices):
        """What a deployment is on its endpoint. Stable is this explicit row, never the
        largest traffic weight; a database constraint allows at most one live stable per
        endpoint (``rollouts.selectors.endpoint_roles`` reads it)."""

        STABLE = "stable", "Stable"
        CANARY = "canary", "Canary"
        SHADOW = "shadow", "Shadow"
        VARIANT = "variant", "Variant"

    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="deployments")
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="deployments"
    )
    request = models.OneToOneField(
        DeploymentRequest, on_delete=models.PROTECT, related_name="deployment"
    )
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.LAUNCHING)
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.STABLE)
    # Written only by ``rollouts.services.traffic_set`` (a unit test greps for other writers).
    traffic_weight = models.PositiveSmallIntegerField(default=0, help_text="percent of traffic")
    artifact_digest = models.CharField(max_length=64, blank=True)
    failure_reason = models.TextField(blank=True)
    started_at = models.DateTimeField(auto_now_add=True)
    live_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at"]
        indexes = [models.Index(fields=["endpoint", "status"])]
        constraints = [
            models.UniqueConstraint(
                fields=["endpoint"],
                condition=models.Q(status="live", role="stable"),
                name="one_live_stable_per_endpoint",
            )
        ]

    def __str__(self) -> str:
        return f"{self.model_version} on {self.endpoint} ({self.status})"


class Rollout(models.Model):
    """How one approved request changes its endpoint's traffic: its own state beside the
    request's (the approval record), and a :class:`RolloutStep` per step of its strategy.

    Made when the request is approved (``rollouts.services``); the direct strategy has one step
    of 100 %. A direct rollout's states follow its request's audited transitions (deployment
    started, live, failed, cancelled), so it writes no audit events of its own.
    """

    class State(models.TextChoices):
        PENDING = "pending", "Pending"
        PROGRESSING = "progressing", "Progressing"
        PAUSED = "paused", "Paused"
        AWAITING_PERSON = "awaiting_person", "Awaiting a person"
        SUCCEEDED = "succeeded", "Succeeded"
        ABORTED = "aborted", "Aborted"

    # The only allowed moves; ``rollouts.services`` raises InvalidTransition for any other.
    TRANSITIONS: dict[str, frozenset[str]] = {
        State.PENDING: frozenset({State.PROGRESSING, State.ABORTED}),
        State.PROGRESSING: frozenset(
            {State.PAUSED, State.AWAITING_PERSON, State.SUCCEEDED, State.ABORTED}
        ),
        State.PAUSED: frozenset({State.PROGRESSING, State.ABORTED}),
        State.AWAITING_PERSON: frozenset({State.PROGRESSING, State.ABORTED}),
        State.SUCCEEDED: frozenset(),
        State.ABORTED: frozenset(),
    }
    ACTIVE = frozenset({State.PENDING, State.PROGRESSING, State.PAUSED, State.AWAITING_PERSON})
    TERMINAL = frozenset({State.SUCCEEDED, State.ABORTED})

    request = models.OneToOneField(
        DeploymentRequest, on_delete=models.PROTECT, related_name="rollout"
    )
    strategy = models.CharField(max_length=32, choices=Strategy.choices)
    state = models.CharField(
        max_length=32, choices=State.choices, default=State.PENDING, db_index=True
    )
    state_reason = models.TextField(blank=True)
    # The claim of the worker advancing the rollout, in the database (the default cache is per
    # process): a step executor takes it with a conditional update; once ``lease_until`` has
    # passed, the claimant is presumed dead and beat may hand the rollout to another worker.
    lease_owner = models.CharField(max_length=64, blank=True, help_text="the claiming worker")
    lease_until = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="the claim's expiry"
    )
    next_check_at = models.DateTimeField(
        null=True, blank=True, db_index=True, help_text="when the step in progress is judged"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"rollout of request #{self.request_id} ({self.strategy}, {self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE


class RolloutStep(models.Model):
    """One step of a rollout: the weight it plans for the new version, when it ran, and the
    analysis verdict with the figures it was judged on (empty verdict: no analysis ran, as in
    the direct strategy's single step)."""

    class Verdict(models.TextChoices):
        PASS = "pass", "Pass"
        FAIL = "fail", "Fail"
        INCONCLUSIVE = "inconclusive", "Inconclusive"

    rollout = models.ForeignKey(Rollout, on_delete=models.CASCADE, related_name="steps")
    index = models.PositiveSmallIntegerField(help_text="0 for the first step")
    planned_weight = models.PositiveSmallIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="percent of traffic for the new version in this step",
    )
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    verdict = models.CharField(max_length=16, choices=Verdict.choices, blank=True)
    figures = models.JSONField(default=dict, blank=True, help_text="what the verdict judged")

    class Meta:
        ordering = ["rollout", "index"]
        constraints = [
            models.UniqueConstraint(fields=["rollout", "index"], name="one_step_per_index"),
            models.CheckConstraint(
                condition=models.Q(planned_weight__gte=1, planned_weight__lte=100),
                name="step_weight_1_to_100",
            ),
        ]

    def __str__(self) -> str:
        return f"step {self.index} ({self.planned_weight}%) of rollout #{self.rollout_id}"


class TrafficHistory(models.Model):
    """One traffic state of an endpoint, from when it was set until the next row: the record
    ``rollouts.services.traffic_set`` writes, and what "what served when" reads.

    ``split`` is what served, ``{"v<version>": percent}`` over the deployments given traffic
    (the ``traffic.changed`` audit event's ``after``); ``deployment_split`` the whole split as
    set, ``{"<deployment id>": percent}``, zeros included. Rows backfilled from audit events
    written before this table existed have the deployment ids that could be matched.
    """

    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="traffic_history")
    split = models.JSONField(default=dict, help_text='percent per version, e.g. {"v1": 100}')
    deployment_split = models.JSONField(
        default=dict, blank=True, help_text="percent per deployment id, as set"
    )
    reason = models.TextField(blank=True)
    rollout_step = models.ForeignKey(
        RolloutStep,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="traffic_changes",
        help_text="the rollout step that set it; empty for rollbacks and older rows",
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    actor_label = models.CharField(max_length=150, help_text="username, or 'system' for tasks")
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        ordering = ["created_at", "pk"]
        verbose_name_plural = "traffic history"
        indexes = [models.Index(fields=["endpoint", "created_at"])]

    def __str__(self) -> str:
        shares = ", ".join(f"{v} {w}%" for v, w in self.split.items()) or "nothing"
        return f"{self.endpoint_id}: {shares} at {self.created_at:%Y-%m-%d %H:%M:%S}"


class ApiKey(models.Model):
    """A client application's key for the serving API. Only its sha256 is stored."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=12, help_text="first characters, to recognise a key")
    key_hash = models.CharField(max_length=64, unique=True)
    endpoints = models.ManyToManyField(Endpoint, related_name="api_keys")
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, on_delete=models.SET_NULL, related_name="+"
    )
    rate_limit_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="scoring requests per minute; empty: unlimited"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class PredictionLog(models.Model):
    """One scored row. A request with k rows writes k entries sharing ``request_id``."""

    request_id = models.UUIDField(default=uuid.uuid4)
    row_index = models.PositiveIntegerField(default=0)
    endpoint = models.ForeignKey(Endpoint, on_delete=models.PROTECT, related_name="predictions")
    model_version = models.ForeignKey(
        ModelVersion, on_delete=models.PROTECT, related_name="predictions"
    )
    # Which deployment answered: a version's canary and stable runs are never mixed. Empty
    # only on rows logged before it was recorded.
    deployment = models.ForeignKey(
        Deployment,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="predictions",
        help_text="the deployment that answered; empty on rows logged before it was recorded",
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.SET_NULL, related_name="predictions"
    )
    inference_id = models.CharField(
        max_length=128,
        blank=True,
        default="",
        help_text="the client's own id for the request (X-Inference-Id header), for late labels",
    )
    features = models.JSONField()
    prediction = models.JSONField()
    score = models.FloatField(
        null=True,
        blank=True,
        help_text="probability of the positive class, logged for binary classifiers",
    )
    latency_ms = models.FloatField(help_text="server time of the whole request, milliseconds")
    created_at = models.DateTimeField(db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["request_id", "row_index"], name="unique_logged_row")
        ]
        indexes = [
            models.Index(fields=["endpoint", "model_version", "created_at"]),
            models.Index(
                fields=["endpoint", "inference_id"],
                name="prediction_inference_id",
                condition=~models.Q(inference_id=""),
            ),
        ]

    def __str__(self) -> str:
        return f"{self.request_id}[{self.row_index}]"


class ServingError(models.Model):
    """One scoring request answered with an error (4xx or 5xx), for error rates.

    ``model_version`` and ``deployment`` are set once the request was routed (bad input, model
    errors); errors before routing (authentication, rate limit) have only the endpoint.
    """

    request_id = models.UUIDField()
    endpoint = models.ForeignKey(Endpoint, on_delete=models.CASCADE, related_name="serving_errors")
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    deployment = models.ForeignKey(
        Deployment,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="the deployment the request was routed to, once routed",
    )
    status_code = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=64)
    created_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["endpoint", "created_at"])]

    def __str__(self) -> str:
        return f"{self.status_code} {self.error_code} on {self.endpoint_id}"


class NotificationOutbox(models.Model):
    """An e-mail owed to people about a deployment request: the transactional outbox.

    Written in the same transaction as the state change it reports
    (:func:`rollouts.notifications.notification_record`), so a broker that is down when the
    transaction commits cannot lose it: the Celery task sends it and marks it ``sent``; beat
    (``rollouts.tasks.resend_notifications``) sends the rows still pending a minute later, under
    a lease per row. After ``NOTIFICATION_MAX_ATTEMPTS`` failed sends a row is ``failed``, with
    the error. Task bookkeeping, like leases: it writes no audit event.
    """

    class Status(models.TextChoices):
        PENDING = "pending", "pending"
        SENT = "sent", "sent"
        FAILED = "failed", "failed"

    request = models.ForeignKey(
        DeploymentRequest, on_delete=models.CASCADE, related_name="notifications"
    )
    event = models.CharField(
        max_length=32, help_text="awaiting_review, or a key of notifications.REQUESTER_EVENTS"
    )
    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True
    )
    attempts = models.PositiveSmallIntegerField(default=0, help_text="failed sends so far")
    last_error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    messages = models.PositiveIntegerField(default=0, help_text="e-mails sent")

    class Meta:
        ordering = ["created_at", "pk"]
        indexes = [models.Index(fields=["status", "created_at"])]

    def __str__(self) -> str:
        return f"#{self.request_id} {self.event} ({self.status})"

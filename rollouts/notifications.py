"""E-mails about deployment requests, through Django's e-mail backend (the console in the demo).

Reviewers hear when a request awaits them; the requester hears of every decision and outcome.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.models import User
from django.core.mail import send_mass_mail

from rollouts.models import DeploymentRequest

REQUESTER_EVENTS = {
    "gates_failed": "failed its automated gates",
    "approved": "was approved and is being deployed",
    "rejected": "was rejected",
    "live": "is live",
    "failed": "failed to deploy",
    "expired": "expired without a decision",
    "rolled_back": "was rolled back",
}


def _reviewers(req: DeploymentRequest) -> list[str]:
    from rollouts.services import approver_group_name

    group = approver_group_name(req.endpoint.environment)
    return list(
        User.objects.filter(groups__name=group, is_active=True)
        .exclude(pk=req.requester_id)
        .exclude(email="")
        .values_list("email", flat=True)
        .distinct()
    )


def send(*, request_id: int, event: str) -> int:
    """Send the messages for ``event`` ("awaiting_review" or a key of ``REQUESTER_EVENTS``).

    Returns the number of messages sent; 0 for an unknown request, event or no recipient.
    """
    req = (
        DeploymentRequest.objects.select_related(
            "model_version__registered_model", "endpoint__environment", "requester"
        )
        .filter(pk=request_id)
        .first()
    )
    if req is None:
        return 0
    link = f"{settings.SITE_URL.rstrip('/')}{req.get_absolute_url()}"
    what = f"{req.model_version} to {req.endpoint.environment.name}"
    if event == "awaiting_review":
        recipients = _reviewers(req)
        subject = f"[Rollgate] Review requested: {what}"
        body = (
            f"{req.requester.get_username()} asks to deploy {what}.\n\n"
            f"Justification: {req.justification}\n\nThe gates passed. Review it at {link}\n"
        )
        messages = [
            (subject, body, settings.DEFAULT_FROM_EMAIL, [address]) for address in recipients
        ]
    elif event in REQUESTER_EVENTS and req.requester.email:
        subject = f"[Rollgate] Request #{req.pk} {REQUESTER_EVENTS[event]}: {what}"
        reason = f"\n\n{req.status_reason}" if req.status_reason else ""
        body = f"Your request #{req.pk} to deploy {what} {REQUESTER_EVENTS[event]}.{reason}\n\n{link}\n"
        messages = [(subject, body, settings.DEFAULT_FROM_EMAIL, [req.requester.email])]
    else:
        return 0
    return send_mass_mail(messages, fail_silently=False) if messages else 0

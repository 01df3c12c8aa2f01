"""Traffic history for the traffic changes made before it existed, from their ``traffic.changed``
audit events, so that every endpoint keeps its "what served when" timeline."""

from django.db import migrations


def backfill_history(apps, schema_editor):
    """One :class:`TrafficHistory` row per ``traffic.changed`` event, in event order, with the
    event's time, actor and ``after`` traffic. ``deployment_split`` names, per version, the
    endpoint's latest deployment of it started by then (none when no such row is left).
    Endpoints that already have history are left alone, so running it again adds nothing."""
    AuditEvent = apps.get_model("portal", "AuditEvent")
    Deployment = apps.get_model("rollouts", "Deployment")
    Endpoint = apps.get_model("rollouts", "Endpoint")
    TrafficHistory = apps.get_model("rollouts", "TrafficHistory")
    endpoints = set(Endpoint.objects.values_list("pk", flat=True))
    done = set(TrafficHistory.objects.values_list("endpoint_id", flat=True))
    deployments: dict[int, list[tuple[int, object, int]]] = {}
    for pk, endpoint_id, version, started_at in Deployment.objects.order_by(
        "started_at", "pk"
    ).values_list("pk", "endpoint_id", "model_version__version", "started_at"):
        deployments.setdefault(endpoint_id, []).append((version, started_at, pk))
    rows = []
    events = AuditEvent.objects.filter(
        action="traffic.changed", object_type="rollouts.Endpoint"
    ).order_by("id")
    for event in events.iterator():
        try:
            endpoint_id = int(event.object_id)
        except ValueError:
            continue
        if endpoint_id not in endpoints or endpoint_id in done:
            continue
        traffic = (event.after or {}).get("traffic") or {}
        split = {}
        for label, weight in traffic.items():
            matches = [
                pk
                for version, started_at, pk in deployments.get(endpoint_id, [])
                if f"v{version}" == label and started_at <= event.created_at
            ]
            if matches:
                split[str(matches[-1])] = weight
        rows.append(
            TrafficHistory(
                endpoint_id=endpoint_id,
                split=traffic,
                deployment_split=split,
                reason=f"from audit event #{event.pk}",
                actor_id=event.actor_id,
                actor_label=event.actor_label,
                created_at=event.created_at,
            )
        )
    TrafficHistory.objects.bulk_create(rows, batch_size=1000)


class Migration(migrations.Migration):
    dependencies = [
        ("portal", "0005_security"),
        ("rollouts", "0010_traffic_history"),
    ]

    operations = [migrations.RunPython(backfill_history, migrations.RunPython.noop)]

"""``Deployment.role``, backfilled, then at most one live stable per endpoint."""

from django.db import migrations, models
from django.db.models import F


def backfill_roles(apps, schema_editor):
    """Per endpoint, the live deployment with the largest traffic weight (ties: the one live
    first) becomes stable and every other live one canary: what the dashboards inferred before.
    Rows that are not live keep the default (stable: what they were when they served)."""
    Deployment = apps.get_model("rollouts", "Deployment")
    live = Deployment.objects.filter(status="live").order_by(
        "endpoint_id", "-traffic_weight", F("live_at").asc(nulls_last=True), "pk"
    )
    stables: dict[int, int] = {}
    canaries = []
    for pk, endpoint_id in live.values_list("pk", "endpoint_id"):
        if endpoint_id in stables:
            canaries.append(pk)
        else:
            stables[endpoint_id] = pk
    # Canaries first: the constraint, once added, allows one live stable per endpoint.
    Deployment.objects.filter(pk__in=canaries).update(role="canary")
    Deployment.objects.filter(pk__in=stables.values()).update(role="stable")


class Migration(migrations.Migration):
    dependencies = [
        ("registry", "0003_deleted_versions"),
        ("rollouts", "0008_notification_outbox"),
    ]

    operations = [
        migrations.AddField(
            model_name="deployment",
            name="role",
            field=models.CharField(
                choices=[
                    ("stable", "Stable"),
                    ("canary", "Canary"),
                    ("shadow", "Shadow"),
                    ("variant", "Variant"),
                ],
                default="stable",
                max_length=16,
            ),
        ),
        migrations.RunPython(backfill_roles, migrations.RunPython.noop),
        migrations.AddConstraint(
            model_name="deployment",
            constraint=models.UniqueConstraint(
                condition=models.Q(("role", "stable"), ("status", "live")),
                fields=("endpoint",),
                name="one_live_stable_per_endpoint",
            ),
        ),
    ]

from django.db import migrations


def forwards(apps, schema_editor):
    """Production: two distinct approvals, and only versions that have been live in staging."""
    Environment = apps.get_model("rollouts", "Environment")
    staging = Environment.objects.filter(name="staging").first()
    Environment.objects.filter(name="production").update(
        required_approvals=2, requires_live_in=staging
    )


class Migration(migrations.Migration):
    dependencies = [("rollouts", "0003_deploymentrequest_artifact_digest_and_more")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]

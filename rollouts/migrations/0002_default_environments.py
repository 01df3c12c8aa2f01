from django.db import migrations

ENVIRONMENTS = (
    ("staging", 10, "Pre-production: the release candidate takes real-shaped traffic."),
    ("production", 20, "Serves client applications."),
)


def forwards(apps, schema_editor):
    Environment = apps.get_model("rollouts", "Environment")
    for name, order, description in ENVIRONMENTS:
        Environment.objects.get_or_create(
            name=name, defaults={"order": order, "description": description}
        )


class Migration(migrations.Migration):
    dependencies = [("rollouts", "0001_initial")]

    operations = [migrations.RunPython(forwards, migrations.RunPython.noop)]

"""API tokens move from DRF's authtoken (plaintext, no expiry) to django-rest-knox (hashed,
expiring). Nothing is carried over: a plaintext token cannot be turned into a knox digest
without keeping it usable forever, so the old tokens are dropped with their table and people
ask for a new one (``POST /api/auth/token`` or ``manage.py api_token <user>``)."""

from __future__ import annotations

from django.db import migrations


def drop_authtoken_content_types(apps, schema_editor):
    ContentType = apps.get_model("contenttypes", "ContentType")
    ContentType.objects.filter(app_label="authtoken").delete()  # and their permissions


class Migration(migrations.Migration):
    dependencies = [
        ("portal", "0004_coord_leases"),
        ("contenttypes", "0002_remove_content_type_name"),
        ("auth", "0012_alter_user_first_name_max_length"),
        ("knox", "0009_extend_authtoken_field"),
    ]

    operations = [
        migrations.RunSQL("DROP TABLE IF EXISTS authtoken_token", migrations.RunSQL.noop),
        migrations.RunPython(drop_authtoken_content_types, migrations.RunPython.noop),
    ]

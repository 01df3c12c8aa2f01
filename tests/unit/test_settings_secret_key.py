"""Commands run beside `make demo` find its secret key (var/secret-key) when SECRET_KEY is not
set; without either, DEBUG off refuses to start, saying how to fix it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _check(var_dir: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SECRET_KEY"}
    env.update(ROLLGATE_VAR_DIR=str(var_dir), DEBUG="0", DATABASE_URL=f"sqlite:///{var_dir}/x.db")
    code = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**env, "DJANGO_SETTINGS_MODULE": "portal.settings"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_demo_key_file_is_read_when_secret_key_is_unset(tmp_path):
    (tmp_path / "secret-key").write_text("from-the-demo-file\n")
    done = _check(tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "from-the-demo-file"


def test_without_a_key_debug_off_refuses_and_says_how(tmp_path):
    done = _check(tmp_path)
    assert done.returncode != 0
    assert "SECRET_KEY must be set" in done.stderr and "var/secret-key" in done.stderr

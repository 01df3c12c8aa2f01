"""Serve single files that installed packages ship (plotly.min.js) as static files, no CDN."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from django.contrib.staticfiles.finders import BaseFinder
from django.core.files.storage import FileSystemStorage

# static path -> (package, path inside the package)
PACKAGE_FILES = {
    "vendor/plotly.min.js": ("plotly", "package_data/plotly.min.js"),
}


def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise LookupError(f"package {package!r} is not installed")
    return Path(spec.origin).parent / relative


class PackageFileFinder(BaseFinder):
    """A staticfiles finder for the files listed in ``PACKAGE_FILES``."""

    def check(self, **kwargs):
        errors = []
        for static_path, (package, relative) in PACKAGE_FILES.items():
            try:
                if not _package_file(package, relative).is_file():
                    raise LookupError(f"{package} does not ship {relative}")
            except LookupError as exc:
                from django.core.checks import Error

                errors.append(Error(f"static file {static_path}: {exc}", id="portal.E001"))
        return errors

    def find(self, path, find_all=False, **kwargs):
        if path not in PACKAGE_FILES:
            return [] if find_all or kwargs.get("all") else None
        found = str(_package_file(*PACKAGE_FILES[path]))
        return [found] if find_all or kwargs.get("all") else found

    def list(self, ignore_patterns):
        for static_path, (package, relative) in PACKAGE_FILES.items():
            source = _package_file(package, relative)
            storage = FileSystemStorage(location=str(source.parent))
            storage.prefix = str(Path(static_path).parent)
            yield source.name, storage

"""Architecture rules read from the source (issue 10, point 1): ``rollouts.services.traffic_set``
is the only writer of ``Deployment.traffic_weight``, and neither ``rollouts`` nor ``registry``
imports ``monitoring``. Both walk the source with :mod:`ast`; migrations are left out."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIELD = "traffic_weight"
WRITER = ("rollouts/services.py", "traffic_set")
# Queryset and model methods that write the fields named by their keyword arguments.
WRITING_CALLS = {"update", "create", "get_or_create", "update_or_create"}


def _modules(*apps: str) -> Iterator[tuple[str, ast.Module]]:
    for app in apps:
        for path in sorted((ROOT / app).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if "/migrations/" not in relative:
                yield relative, ast.parse(path.read_text(), filename=relative)


def _names_field(node: ast.AST) -> bool:
    """A target ``x.traffic_weight`` (also inside a tuple of targets)."""
    if isinstance(node, ast.Attribute):
        return node.attr == FIELD
    if isinstance(node, ast.Tuple | ast.List):
        return any(_names_field(e) for e in node.elts)
    if isinstance(node, ast.Starred):
        return _names_field(node.value)
    return False


def _mentions_field(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and n.value == FIELD for n in ast.walk(node))


def _writes(node: ast.AST) -> bool:
    if isinstance(node, ast.Assign):
        return any(_names_field(t) for t in node.targets)
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return _names_field(node.target)
    if not isinstance(node, ast.Call):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
    if name == "setattr" and len(node.args) >= 2 and _mentions_field(node.args[1]):
        return True
    if name == "bulk_update" and any(_mentions_field(a) for a in node.args[1:]):
        return True
    for kw in node.keywords:
        if kw.arg == FIELD and (name in WRITING_CALLS or name == "Deployment"):
            return True
        if kw.arg in {"update_fields", "fields", "defaults", "create_defaults"} and _mentions_field(
            kw.value
        ):
            return True
        if kw.arg is None and name in WRITING_CALLS and _mentions_field(kw.value):
            return True  # update(**{"traffic_weight": ...})
    return False


def traffic_weight_writes(path: str, tree: ast.Module) -> list[tuple[str, int, str]]:
    """``(path, line, enclosing function)`` of every write of ``traffic_weight`` in ``tree``."""
    found = []

    def visit(node: ast.AST, function: str) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            function = node.name
        if _writes(node):
            found.append((path, node.lineno, function))
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(tree, "")
    return found


def test_only_traffic_set_writes_traffic_weight():
    writes = [
        w
        for path, tree in _modules("rollouts", "monitoring", "portal", "registry")
        for w in traffic_weight_writes(path, tree)
    ]
    elsewhere = [
        f"{path}:{line} in {fn or 'module'}()" for path, line, fn in writes if (path, fn) != WRITER
    ]
    assert not elsewhere, "traffic_weight written outside traffic_set: " + ", ".join(elsewhere)
    # The scan does see the writer itself, so an empty list above is not a blind scan.
    assert any((path, fn) == WRITER for path, _, fn in writes)


@pytest.mark.parametrize(
    "source",
    [
        "d.traffic_weight = 100",
        "d.status, d.traffic_weight, d.retired_at = 'retired', 0, now",
        "d.traffic_weight += 10",
        "Deployment.objects.filter(pk=1).update(status='failed', traffic_weight=0)",
        "Deployment.objects.create(endpoint=e, traffic_weight=100)",
        "Deployment(endpoint=e, traffic_weight=100)",
        "Deployment.objects.update_or_create(pk=1, defaults={'traffic_weight': 5})",
        "d.save(update_fields=['status', 'traffic_weight'])",
        "Deployment.objects.bulk_update(rows, ['traffic_weight'])",
        "setattr(d, 'traffic_weight', 3)",
        "qs.update(**{'traffic_weight': 0})",
    ],
)
def test_the_traffic_weight_scan_finds_each_kind_of_write(source):
    tree = ast.parse(f"def elsewhere():\n    {source}\n")
    assert traffic_weight_writes("x.py", tree) == [("x.py", 2, "elsewhere")]


@pytest.mark.parametrize(
    "source",
    [
        "Deployment.objects.filter(traffic_weight__gt=0)",
        "VersionFigures(role=role, traffic_weight=weight)",
        "w = d.traffic_weight",
        "values_list('pk', 'traffic_weight')",
    ],
)
def test_the_traffic_weight_scan_ignores_reads(source):
    assert traffic_weight_writes("x.py", ast.parse(source)) == []


# --- rollouts and registry never import monitoring ----------------------------------------


def _is_monitoring(module: str) -> bool:
    return module == "monitoring" or module.startswith("monitoring.")


def monitoring_imports(path: str, tree: ast.Module) -> list[tuple[str, int, str]]:
    """``(path, line, module)`` of every import of ``monitoring`` in ``tree``, at any depth
    (function-level imports too): ``import``, ``from ... import`` (relative ones resolved from
    ``path``), and ``importlib.import_module`` / ``__import__`` of a literal name."""
    package = path.removesuffix(".py").split("/")
    package = package[:-1] if package[-1] != "__init__" else package[:-1]
    found = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else package
                prefix = ".".join(base)
                base_module = f"{prefix}.{node.module}" if node.module else prefix
            else:
                base_module = node.module or ""
            modules = [base_module, *(f"{base_module}.{alias.name}" for alias in node.names)]
            modules = [m.strip(".") for m in modules]
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in {"import_module", "__import__"} and node.args:
                first = node.args[0]
                if isinstance(first, ast.Constant) and isinstance(first.value, str):
                    modules = [first.value]
        for module in modules:
            if _is_monitoring(module):
                found.append((path, node.lineno, module))
                break
    return found


def test_rollouts_and_registry_do_not_import_monitoring():
    imports = [
        f"{path}:{line} imports {module}"
        for path, tree in _modules("rollouts", "registry")
        for path, line, module in monitoring_imports(path, tree)
    ]
    assert not imports, "; ".join(imports)


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import monitoring", "monitoring"),
        ("import os, monitoring.rollups as r", "monitoring.rollups"),
        ("from monitoring import alerts", "monitoring"),
        ("def f():\n    from monitoring.rollups import mark_logged_rows", "monitoring.rollups"),
        ("class A:\n    def f(self):\n        import monitoring.services", "monitoring.services"),
        ("import importlib\nimportlib.import_module('monitoring.rollups')", "monitoring.rollups"),
        ("__import__('monitoring')", "monitoring"),
        ("from ... import monitoring", "monitoring"),
        ("from ...monitoring.rollups import x", "monitoring.rollups"),
    ],
)
def test_the_import_scan_finds_each_kind_of_import(source, module):
    found = monitoring_imports("rollouts/serving/logbuffer.py", ast.parse(source))
    assert [m for _, _, m in found] == [module]


@pytest.mark.parametrize(
    "source",
    [
        "import monitoring_tools",
        "from rollouts import hooks",
        "from . import batching",
        "from .. import models",
        "x = 'monitoring'",
    ],
)
def test_the_import_scan_ignores_other_imports(source):
    assert monitoring_imports("rollouts/serving/logbuffer.py", ast.parse(source)) == []

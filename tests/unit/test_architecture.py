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

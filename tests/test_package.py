"""The package itself: its layout by concept, the public surface at the top, no private imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import davsp_lib

PACKAGE = Path(davsp_lib.__file__).resolve().parent
PROJECT = PACKAGE.parent


def test_the_top_holds_only_the_concept_subpackages():
    entries = sorted(p.name for p in PACKAGE.iterdir() if p.name != "__pycache__")
    assert entries == [
        "__init__.py",
        "data",
        "evaluation",
        "method",
        "models",
        "py.typed",
        "runtime",
    ]


@pytest.mark.parametrize("name", davsp_lib.__all__)
def test_every_public_name_imports_from_the_top(name):
    value = getattr(davsp_lib, name)
    if name == "__version__":
        assert value == "0.1.0"
        return
    home = sys.modules[value.__module__]
    assert home.__name__.startswith("davsp_lib.")
    assert getattr(home, name) is value  # the library's own object, not a copy


def test_the_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from davsp_lib import *", namespace)
    assert sorted(set(namespace) - {"__builtins__"}) == sorted(davsp_lib.__all__)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'steering'"):
        _ = davsp_lib.steering


def test_import_davsp_lib_stays_light():
    """The public names load on first use: ``import davsp_lib`` imports only the exceptions."""
    code = (
        "import sys; before = set(sys.modules); import davsp_lib; "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('davsp_lib')))"
        "; print(sorted(m for m in ('numpy', 'torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT,
        env={"PYTHONPATH": str(PROJECT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.splitlines() == [
        "['davsp_lib', 'davsp_lib.runtime', 'davsp_lib.runtime.errors']",
        "[]",
    ]


def is_module(dotted: str) -> bool:
    """A davsp_lib module or subpackage, found on disk (nothing is imported)."""
    path = PROJECT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def private_uses(tree: ast.AST) -> list[str]:
    """Underscore names taken from a davsp_lib module: imported, or read off an imported module."""
    found, modules = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("davsp_lib"):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                elif is_module(f"{node.module}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("davsp_lib") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            found.append(f"{node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_the_private_name_rule_can_fail():
    source = (
        "from davsp_lib.method.vectors import _hidden\n"
        "from davsp_lib.method import training as t\n"
        "x = t._seed + t.train\n"
        "from davsp_lib.runtime.io import read_json\n"
        "y = read_json._cache\n"  # a function's attribute, not a module's name
    )
    assert private_uses(ast.parse(source)) == [
        "1: from davsp_lib.method.vectors import _hidden",
        "3: t._seed",
    ]


def test_no_module_uses_a_private_name_of_another():
    offenders = {
        str(path.relative_to(PROJECT)): uses
        for path in sorted(PACKAGE.rglob("*.py"))
        if (uses := private_uses(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert offenders == {}

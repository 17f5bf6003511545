"""Every package flexep imports is declared: the CPU wheel of torch brings no NumPy, and a fresh
machine has nothing else. Imports of packages declared only in an extra must be lazy (inside a
function or guarded by ``except ImportError``), so ``pip install flexep`` alone imports cleanly."""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import re
import sys

import pytest

import flexep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Distribution name -> import name where they differ.
IMPORT_NAMES = {"torch-npu": "torch_npu", "pyyaml": "yaml", "megatron-core": "megatron"}


def _requirements() -> tuple[set, set]:
    """(import names of required packages, import names of packages in extras only)."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]

    def names(reqs) -> set:
        out = set()
        for req in reqs:
            dist_name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].strip().lower()
            out.add(IMPORT_NAMES.get(dist_name, dist_name.replace("-", "_")))
        return out

    required = names(project.get("dependencies", []))
    extras = set().union(*(names(v) for v in project.get("optional-dependencies", {}).values()))
    return required, extras - required


def _imports(path: str):
    """``(top-level module, lazy)`` for every absolute import in the file."""
    tree = ast.parse(open(path).read(), path)
    guarded: set = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            guarded.update(id(n) for n in ast.walk(node) if n is not node)
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            guarded.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name.split(".")[0], id(node) in guarded
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0], id(node) in guarded


def _sources():
    for base in ("flexep",):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def test_every_import_is_declared():
    required, extras = _requirements()
    allowed = set(sys.stdlib_module_names) | {"flexep", "torch"} | required
    problems = []
    for path in _sources():
        for module, lazy in _imports(path):
            if module in allowed:
                continue
            where = os.path.relpath(path, ROOT)
            if module in extras:
                if not lazy:
                    problems.append(f"{where}: `import {module}` (an optional extra) must be lazy")
                continue
            problems.append(f"{where}: imports `{module}`, which pyproject.toml does not declare")
    assert not problems, "\n".join(problems)


def test_declared_check_can_fail(tmp_path):
    """The checker sees an undeclared top-level import (guards the guard)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import numpy\n\ndef f():\n    import matplotlib\n")
    assert list(_imports(str(bad))) == [("numpy", False), ("matplotlib", True)]


def test_every_module_imports():
    """Every flexep module imports with only the declared requirements installed."""
    failures = []
    for info in pkgutil.walk_packages(flexep.__path__, "flexep."):
        if info.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(info.name)
        except Exception as exc:  # noqa: BLE001 - reported below with the module name
            failures.append(f"{info.name}: {type(exc).__name__}: {exc}")
    assert not failures, "\n".join(failures)


def test_installed_version_is_the_package_version():
    """pip's metadata and ``flexep.__version__`` come from one place (pyproject reads the
    attribute), so a bug report names the release that is installed."""
    metadata = pytest.importorskip("importlib.metadata")
    try:
        installed = metadata.version("flexep")
    except metadata.PackageNotFoundError:
        pytest.skip("flexep is imported from a source tree, not installed")
    assert installed == flexep.__version__

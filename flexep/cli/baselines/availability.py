"""Which framework dispatchers this machine can run, and why not, without importing them.

The drivers call framework internals (dispatcher constructors and phase methods, process-group
containers, module paths their import shims name) that these projects do not promise to keep, so
each is pinned to the release it was written and checked against.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import sys
import types
from dataclasses import dataclass

__all__ = ["Framework", "check_installed", "DOCS"]

DOCS = "docs/benchmarks.md#framework-dispatchers"


@dataclass(frozen=True)
class Framework:
    """One baseline.

    Attributes:
        name: short key (JSON field, table row).
        label: what the conclusion calls it.
        dist: the distribution to look up; version: the release the driver is written for.
        modules: top-level modules its import needs (the package and the dependencies that a
            ``--no-deps`` install must add).
        install: the command that installs it here (see :data:`DOCS`).
    """

    name: str
    label: str
    dist: str
    version: str
    modules: tuple
    install: str


def check_installed(fw: Framework) -> tuple[bool, str]:
    """``(True, version)`` when ``fw.dist`` is installed at the tested version and every module of
    ``fw.modules`` can be found; else ``(False, reason)``. Imports nothing."""
    try:
        found = importlib.metadata.version(fw.dist)
    except importlib.metadata.PackageNotFoundError:
        return False, f"{fw.dist} is not installed"
    if found != fw.version:
        return False, f"{fw.dist} {found} is installed; the driver is written for {fw.version}"
    missing = [m for m in fw.modules if importlib.util.find_spec(m) is None]
    if missing:
        return False, f"{fw.dist} {found} is installed but {', '.join(missing)} is missing"
    return True, found


def _unavailable(*_args, **_kwargs):
    raise NotImplementedError("triton kernels are unavailable here")


def stub_triton_module(name: str, kernels: tuple, **values) -> None:
    """Where triton is missing, put a stand-in for module ``name`` (one the framework imports
    unconditionally and that imports triton) in ``sys.modules``: each of ``kernels`` raises if
    called, ``values`` are plain attributes. Where triton is installed the real module imports."""
    if name in sys.modules or importlib.util.find_spec("triton") is not None:
        return
    stub = types.ModuleType(name)
    for kernel in kernels:
        setattr(stub, kernel, _unavailable)
    for key, value in values.items():
        setattr(stub, key, value)
    sys.modules[name] = stub

"""Hardware presets: one small module per cluster, each defining ``HARDWARE``.

Adding a preset is adding a file here (``my_cluster.py`` with ``HARDWARE = Hardware(...)``);
it is found by name, nothing else to register. Modules are imported only when asked for.
"""

from __future__ import annotations

import importlib
import pkgutil

from ..hardware import Hardware

__all__ = ["preset_names", "get_preset"]


def preset_names() -> list[str]:
    """Names of the shipped presets (module names in this package), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get_preset(name: str) -> Hardware:
    """The ``HARDWARE`` of preset ``name`` (see :func:`preset_names`)."""
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown hardware preset {name!r}; available: {', '.join(names)}")
    hw = getattr(importlib.import_module(f"{__name__}.{name}"), "HARDWARE", None)
    if not isinstance(hw, Hardware):
        raise TypeError(f"preset module {name!r} must define HARDWARE = Hardware(...)")
    return hw

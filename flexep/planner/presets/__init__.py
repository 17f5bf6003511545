"""Hardware presets: one small module per cluster, each defining ``PRESET``, a dict in the
preset format of :meth:`flexep.planner.hardware.Hardware.from_dict` (documented with units in
``docs/planner.md``).

Adding a preset is adding a file here (``my_cluster.py`` with ``PRESET = {...}``); it is found
by name, nothing else to register. A JSON file in the same format works anywhere a preset name
does (``flexep plan --preset my_cluster.json``). Modules are imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil

from ..hardware import Hardware

__all__ = ["preset_names", "get_preset", "load_preset"]


def preset_names() -> list[str]:
    """Names of the shipped presets (module names in this package), sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def load_preset(path: str) -> Hardware:
    """A :class:`Hardware` from a JSON file in the preset format."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"preset file {path} is not valid JSON: {exc}") from None
    return Hardware.from_dict(data)


def get_preset(name: str) -> Hardware:
    """The :class:`Hardware` of preset ``name`` (see :func:`preset_names`), or of a JSON file
    when ``name`` ends in ``.json``."""
    if name.endswith(".json"):
        if not os.path.exists(name):
            raise FileNotFoundError(f"preset file {name} does not exist")
        return load_preset(name)
    names = preset_names()
    if name not in names:
        raise ValueError(f"unknown hardware preset {name!r}; available: {', '.join(names)} "
                         f"(or a path to a .json preset)")
    data = getattr(importlib.import_module(f"{__name__}.{name}"), "PRESET", None)
    if not isinstance(data, dict):
        raise TypeError(f"preset module {name!r} must define PRESET = {{...}} (a preset dict)")
    return Hardware.from_dict(data)

"""Stable import path: the normal-mode handle lives in :mod:`flexep.algorithms.contract`."""

from .algorithms.contract import NormalHandle

__all__ = ["NormalHandle"]

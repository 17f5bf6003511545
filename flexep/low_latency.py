"""Stable import path: the low-latency handle lives in :mod:`flexep.algorithms.contract`."""

from .algorithms.contract import LowLatencyHandle

__all__ = ["LowLatencyHandle"]

"""Stable import path: EP checkpoints live in :mod:`flexep.moe.checkpoint`."""

from .moe.checkpoint import consolidate, load, local_state_dict, save

__all__ = ["save", "load", "consolidate", "local_state_dict"]

"""Stable import path: ``flexep.buffer.Buffer`` lives in :mod:`flexep.deepep.buffer`."""

from .deepep.buffer import Buffer, topk_idx_t

__all__ = ["Buffer", "topk_idx_t"]

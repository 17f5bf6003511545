"""DeepEP's public APIs as faces over :mod:`flexep.core`: V1 ``Buffer``."""

from .buffer import Buffer, topk_idx_t

__all__ = ["Buffer", "topk_idx_t"]

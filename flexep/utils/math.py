"""``deep_ep.utils.math``: DeepEP V2's small math and FP8 helpers, device-neutral."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import (
    calc_diff,
    create_grouped_scores,
    hash_tensor,
    inplace_unique,
    per_token_cast_back,
    per_token_cast_to_fp8,
)

__all__ = ["calc_diff", "safe_div", "ceil_div", "align", "per_token_cast_to_fp8", "per_token_cast_back",
           "inplace_unique", "create_grouped_scores", "hash_tensor", "hash_tensors", "count_bytes"]


def safe_div(a, b) -> float:
    """``a / b``, with ``0 / 0 = 0`` (any other division by zero still raises)."""
    if b == 0 and a == 0:
        return 0
    return a / b


def ceil_div(x: int, y: int) -> int:
    return (x + y - 1) // y


def align(x: int, y: int) -> int:
    """``x`` rounded up to a multiple of ``y``. Example: ``align(5, 4) == 8``."""
    return ceil_div(x, y) * y


def hash_tensors(tensors: Sequence[Optional[torch.Tensor]]) -> int:
    """Sum of :func:`hash_tensor` over the tensors (None skipped)."""
    return sum(hash_tensor(t) for t in tensors if t is not None)


def count_bytes(*tensors) -> int:
    """Bytes of every tensor given (nested tuples/lists allowed, None skipped)."""
    total = 0
    for t in tensors:
        if isinstance(t, (tuple, list)):
            total += count_bytes(*t)
        elif isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total

"""Helpers DeepEP's tests and callers use: FP8 casts, a similarity metric, a bitwise hash.

``from flexep.utils import per_token_cast_to_fp8, per_token_cast_back`` mirrors DeepEP's test
utilities so code written against them ports unchanged.
"""

from __future__ import annotations

import torch

from .event import EventOverlap
from .quant import pack_ue8m0, per_token_cast_back, per_token_cast_to_fp8, unpack_ue8m0

__all__ = ["EventOverlap", "per_token_cast_to_fp8", "per_token_cast_back", "pack_ue8m0",
           "unpack_ue8m0", "calc_diff", "hash_tensor"]


def calc_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    """DeepEP's similarity loss: ``1 - 2 sum(xy) / sum(x^2 + y^2)`` after shifting both by +1.

    0 means identical; computed in float64.
    """
    x, y = x.double() + 1, y.double() + 1
    denominator = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denominator)


def hash_tensor(t: torch.Tensor) -> int:
    """Sum of the tensor's bytes read as int64-widened int32 words: equal hashes for equal bits."""
    flat = t.contiguous().view(torch.uint8).flatten()
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return int(flat.view(torch.int32).sum(dtype=torch.int64))

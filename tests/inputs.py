"""Deterministic, rank-stamped test inputs shared by the multi-rank tests.

Token t of rank r carries ``r`` in column 0 and ``t`` in column 1 (exact in every dtype for
t < 256), so a misrouted row names its origin in the failure message.
"""

from __future__ import annotations

from typing import Optional

import torch

from flexep.quant import per_token_cast_to_fp8


def routing(gen: torch.Generator, num_tokens: int, num_experts: int, num_topk: int,
            pattern: str = "random", num_ranks: int = 1) -> torch.Tensor:
    """``[T, K] int64`` top-k expert ids, no repeats in a row, by pattern.

    ``random``: uniform top-k; ``one_rank``: only experts of rank 0; ``none``: all -1;
    ``holes``: random with about a quarter of the slots set to -1.
    """
    if pattern == "none":
        return torch.full((num_tokens, num_topk), -1, dtype=torch.int64)
    pool = num_experts
    if pattern == "one_rank":
        pool = num_experts // num_ranks
    scores = torch.rand(num_tokens, pool, generator=gen)
    idx = scores.topk(min(num_topk, pool), dim=1).indices
    if idx.size(1) < num_topk:
        idx = torch.cat([idx, idx.new_full((num_tokens, num_topk - idx.size(1)), -1)], 1)
    if pattern == "holes":
        idx[torch.rand(idx.shape, generator=gen) < 0.25] = -1
    return idx.contiguous()


def stamped_x(gen: torch.Generator, rank: int, num_tokens: int, hidden: int,
              dtype: torch.dtype) -> torch.Tensor:
    """``[T, H]`` with column 0 = rank, column 1 = token index (mod 256), the rest random."""
    x = torch.randn(num_tokens, hidden, generator=gen)
    x[:, 0] = rank
    x[:, 1] = torch.arange(num_tokens) % 256
    return x.to(dtype)


def make_x(gen: torch.Generator, rank: int, num_tokens: int, hidden: int, kind: str):
    """``x`` for dispatch: a float tensor, or an FP8 tuple (``fp8``, ``fp8_colmajor``, ``ue8m0``)."""
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
              "fp64": torch.float64}
    if kind in dtypes:
        return stamped_x(gen, rank, num_tokens, hidden, dtypes[kind])
    base = stamped_x(gen, rank, num_tokens, hidden, torch.float32)
    if kind == "ue8m0":
        return per_token_cast_to_fp8(base, round_scale=True, use_ue8m0=True)
    q, s = per_token_cast_to_fp8(base)
    if kind == "fp8_colmajor":
        s = s.t().contiguous().t()  # DeepEP's tests pass column-major scales
    return q, s


def weights(gen: torch.Generator, topk_idx: torch.Tensor, rank: Optional[int] = None) -> torch.Tensor:
    """``[T, K] float32`` positive weights (rank-valued when ``rank`` is given)."""
    if rank is not None:
        return torch.full(topk_idx.shape, float(rank + 1))
    return torch.rand(topk_idx.shape, generator=gen) + 0.1

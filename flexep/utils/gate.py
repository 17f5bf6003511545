"""``deep_ep.utils.gate``: router scores with a chosen load imbalance, for tests and benchmarks.

``get_unbalanced_scores(..., ratio)`` returns uniform scores ``[T, E]`` whose top-k makes rank 0
receive about ``ratio`` times the tokens of an average other rank: rank 0's experts draw from
``[0, f)`` instead of ``[0, 1)``, with ``f`` found by bisection (``ratio = 1``: plain uniform).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["get_unbalanced_scores", "get_scores_by_factor"]


def get_scores_by_factor(num_tokens: int, num_experts: int, num_ranks: int, factor: float,
                         device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None
                         ) -> torch.Tensor:
    """Uniform float32 scores, rank 0's experts scaled by ``factor``."""
    scores = torch.rand(num_tokens, num_experts, generator=generator, dtype=torch.float32)
    scores[:, :num_experts // num_ranks] *= factor
    return scores.to(device) if device is not None else scores


def _rank0_ratio(scores: torch.Tensor, num_ranks: int, num_topk: int) -> float:
    owner = scores.topk(num_topk, dim=1).indices // (scores.size(1) // num_ranks)
    hit = torch.zeros(scores.size(0), num_ranks, dtype=torch.bool).scatter_(1, owner, True).float().sum(0)
    rest = hit[1:].mean() if num_ranks > 1 else hit[0]
    return float(hit[0] / rest.clamp(min=1))


def get_unbalanced_scores(num_tokens: int, num_experts: int, num_ranks: int, num_topk: int,
                          ratio: float = 1.0,
                          precise: bool = False, device: Optional[torch.device] = None) -> torch.Tensor:
    """Scores ``[T, E] float32`` with rank 0 about ``ratio`` times as loaded as the others."""
    if ratio < 1.0:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    if precise:
        raise NotImplementedError("precise=True (DeepEP's exact per-token rank counts) is not provided; "
                                  "use precise=False")
    factor = 1.0
    if ratio != 1.0 and num_ranks > 1:
        lo, hi = 1.0, 100.0
        for _ in range(20):
            mid = (lo + hi) / 2
            if _rank0_ratio(get_scores_by_factor(num_tokens, num_experts, num_ranks, mid), num_ranks,
                            num_topk) > ratio:
                hi = mid
            else:
                lo = mid
        factor = lo
    return get_scores_by_factor(num_tokens, num_experts, num_ranks, factor, device)

"""Routing math: from ``topk_idx`` to counts, masks and send orders.

Pure tensor functions, no communication. Shape legend used across flexep:

    T  tokens on this rank          H  hidden size
    K  top-k slots per token        E  experts (global)
    W  ranks in the EP group        L  local experts per rank, E / W
    N  nodes                        P  ranks per node, W / N
    M  tokens received by this rank

Experts are laid out contiguously: rank ``r`` holds experts ``[r * L, (r + 1) * L)``.
A ``topk_idx`` entry of ``-1`` marks an unused slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = [
    "DispatchLayout",
    "compute_layout",
    "rank_of_expert",
    "expert_histogram",
    "to_local_expert_ids",
    "aligned_expert_counts",
]


@dataclass(frozen=True)
class DispatchLayout:
    """What ``get_dispatch_layout`` returns, as DeepEP defines it.

    Attributes:
        num_tokens_per_rank: ``[W] int32``, distinct tokens with at least one expert on rank r.
        num_tokens_per_node: ``[N] int32`` distinct tokens with an expert on node n, or ``None``
            when the group spans a single node (DeepEP's ``num_tokens_per_rdma_rank``).
        num_tokens_per_expert: ``[E] int32``, (token, slot) entries choosing expert e.
        is_token_in_rank: ``[T, W] bool``, token t has at least one expert on rank r.
    """

    num_tokens_per_rank: torch.Tensor
    num_tokens_per_node: Optional[torch.Tensor]
    num_tokens_per_expert: torch.Tensor
    is_token_in_rank: torch.Tensor


def expert_histogram(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[E] int64``: (token, slot) pairs choosing each expert; ``-1`` and out-of-range ignored.

    A scatter-add into a fixed ``[E + 1]`` (a spare bin for everything else), not ``bincount``,
    whose output size depends on the data (a host read on accelerators).
    Example (E = 4): ``[[0, 3], [3, -1]] -> [1, 0, 0, 2]``.
    """
    flat = topk_idx.reshape(-1)
    ok = (flat >= 0) & (flat < num_experts)
    hist = torch.zeros(num_experts + 1, dtype=torch.int64, device=topk_idx.device)
    hist.index_add_(0, torch.where(ok, flat, num_experts), torch.ones_like(flat, dtype=torch.int64))
    return hist[:num_experts]


def rank_of_expert(topk_idx: torch.Tensor, num_experts: int, num_ranks: int) -> torch.Tensor:
    """Owning rank of each slot, ``-1`` where the slot is unused.

    Example (E = 8, W = 4, so L = 2): ``[[0, 5, -1]] -> [[0, 2, -1]]``.
    """
    local = num_experts // num_ranks
    return torch.where(topk_idx >= 0, torch.div(topk_idx, local, rounding_mode="floor"), -1)


def _membership(owner: torch.Tensor, num_groups: int) -> torch.Tensor:
    """``[T, G] bool``: row t has at least one slot owned by group g (``owner`` -1 = none)."""
    num_tokens = owner.size(0)
    hit = torch.zeros(num_tokens, num_groups + 1, dtype=torch.bool, device=owner.device)
    # Unused slots land in a spare column that is dropped, so no mask or host sync is needed.
    hit.scatter_(1, torch.where(owner >= 0, owner, num_groups), True)
    return hit[:, :num_groups].contiguous()


def compute_layout(
    topk_idx: torch.Tensor,
    num_experts: int,
    num_ranks: int,
    ranks_per_node: Optional[int] = None,
) -> DispatchLayout:
    """Counts and masks for dispatching ``topk_idx: [T, K] int64`` over ``num_ranks`` ranks.

    ``ranks_per_node`` (ranks ``n*P .. n*P+P-1`` form node n) enables per-node counts; with
    ``None`` or a single node, ``num_tokens_per_node`` is ``None`` as in DeepEP intranode mode.

    Example (E = 4, W = 2): ``topk_idx = [[0, 1], [1, 3], [-1, -1]]`` gives
    ``num_tokens_per_rank = [2, 1]``, ``num_tokens_per_expert = [1, 2, 0, 1]`` and
    ``is_token_in_rank = [[1, 0], [1, 1], [0, 0]]``.
    """
    owner = rank_of_expert(topk_idx, num_experts, num_ranks)
    is_token_in_rank = _membership(owner, num_ranks)
    num_tokens_per_rank = is_token_in_rank.sum(0, dtype=torch.int32)
    num_tokens_per_expert = expert_histogram(topk_idx, num_experts).to(torch.int32)
    num_tokens_per_node = None
    if ranks_per_node is not None and num_ranks // ranks_per_node > 1:
        node = torch.where(owner >= 0, torch.div(owner, ranks_per_node, rounding_mode="floor"), -1)
        per_node = _membership(node, num_ranks // ranks_per_node)
        num_tokens_per_node = per_node.sum(0, dtype=torch.int32)
    return DispatchLayout(
        num_tokens_per_rank=num_tokens_per_rank,
        num_tokens_per_node=num_tokens_per_node,
        num_tokens_per_expert=num_tokens_per_expert,
        is_token_in_rank=is_token_in_rank,
    )


def to_local_expert_ids(topk_idx: torch.Tensor, rank: int, num_local_experts: int) -> torch.Tensor:
    """Global expert ids -> ids local to ``rank``, ``-1`` for experts held elsewhere.

    Example (L = 2, rank 1): ``[[2, 0, 3, -1]] -> [[0, -1, 1, -1]]``.
    """
    local = topk_idx - rank * num_local_experts
    return torch.where((local >= 0) & (local < num_local_experts) & (topk_idx >= 0), local, -1)


def aligned_expert_counts(counts: list[int], alignment: int) -> list[int]:
    """Round each count up to a multiple of ``alignment``. Example (4): ``[0, 1, 4, 5] -> [0, 4, 4, 8]``."""
    return [(c + alignment - 1) // alignment * alignment for c in counts]
